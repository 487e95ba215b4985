"""Learning R1 and R2 for one decoder layer by minimising the entropy loss (SPEC §4)."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..settings import RotationSettings
from .fuse import block_diag, expand_kv_blocks
from .loss import InputStatistic, LossVariant, ScoreName, linear_entropy

log = logging.getLogger(__name__)

@dataclass
class LayerProblem:
    """Frozen, norm-folded weights of one layer and the input statistics of its linears."""

    weights: dict[str, torch.Tensor]
    inputs: dict[str, InputStatistic]
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_layer(
        cls,
        weights: dict[str, torch.Tensor],
        grams: dict[str, torch.Tensor | None],
        score: ScoreName,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        variant: LossVariant = "paper",
        percdamp: float = 0.01,
    ) -> LayerProblem:
        """`grams` holds the Gram matrix of each linear's input, keyed by linear name."""
        representative = {"attn": "q", "o": "o", "mlp": "gate", "down": "down"}
        inputs = {
            key: InputStatistic.from_gram(score, grams.get(name), variant=variant, percdamp=percdamp)
            for key, name in representative.items()
        }
        return cls(
            {name: weight.detach().to(torch.float32) for name, weight in weights.items()},
            inputs,
            num_heads,
            num_kv_heads,
            head_dim,
        )

    def identity(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.weights["q"].device
        hidden = self.weights["q"].shape[1]
        rotation = torch.eye(hidden, device=device)
        blocks = torch.eye(self.head_dim, device=device).repeat(self.num_kv_heads, 1, 1)
        return rotation, blocks


def layer_loss(
    problem: LayerProblem, rotation: torch.Tensor, blocks: torch.Tensor, variant: LossVariant
) -> torch.Tensor:
    """Plain sum of the group entropies of the seven rotated linears (no weights, no regulariser)."""
    compute_dtype = torch.bfloat16 if variant == "reference" else torch.float32
    w = {name: weight.to(compute_dtype) for name, weight in problem.weights.items()}
    q = rotation.to(compute_dtype)
    r2v = block_diag(blocks).to(compute_dtype)
    r2o = block_diag(expand_kv_blocks(blocks, problem.num_heads)).to(compute_dtype)

    factors = {
        "attn": problem.inputs["attn"].column_factor(rotation),
        "o": problem.inputs["o"].column_factor(block_diag(expand_kv_blocks(blocks, problem.num_heads))),
        "mlp": problem.inputs["mlp"].column_factor(rotation),
        "down": problem.inputs["down"].column_factor(None),
    }
    factors = {key: None if f is None else f.to(compute_dtype) for key, f in factors.items()}

    loss = linear_entropy(w["q"] @ q, factors["attn"], rows=True, columns=False)
    loss = loss + linear_entropy(w["k"] @ q, factors["attn"], rows=True, columns=False)
    loss = loss + linear_entropy(r2v.T @ w["v"] @ q, factors["attn"], rows=True, columns=True)
    loss = loss + linear_entropy(q.T @ w["o"] @ r2o, factors["o"], rows=True, columns=True)
    loss = loss + linear_entropy(w["gate"] @ q, factors["mlp"], rows=True, columns=False)
    loss = loss + linear_entropy(w["up"] @ q, factors["mlp"], rows=True, columns=False)
    loss = loss + linear_entropy(q.T @ w["down"], factors["down"], rows=False, columns=True)
    return loss.to(torch.float32)


def orthogonal_from(free: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition with R's diagonal made positive, so Q(I) = I and Q is continuous."""
    q, r = torch.linalg.qr(free)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


@dataclass
class RotationResult:
    rotation: torch.Tensor
    head_blocks: torch.Tensor
    loss_start: float
    loss_best: float
    best_step: int
    steps: int
    seconds: float
    loss_trace: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {
            "entropy_before": self.loss_start,
            "entropy_after": self.loss_best,
            "rotation_best_step": self.best_step,
            "rotation_steps": self.steps,
            "rotation_seconds": self.seconds,
        }


def train_rotation(
    problem: LayerProblem, settings: RotationSettings, progress: bool = True, description: str = "rotation"
) -> RotationResult:
    """Adam on the free matrices behind QR; keeps the best iterate seen (identity included)."""
    start = time.perf_counter()
    identity_rotation, identity_blocks = problem.identity()
    free_rotation = identity_rotation.clone().requires_grad_(True)
    free_blocks = identity_blocks.clone().requires_grad_(settings.learn_r2)
    parameters = [free_rotation] + ([free_blocks] if settings.learn_r2 else [])
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, betas=settings.betas)

    best_loss = float("inf")
    best = (identity_rotation, identity_blocks)
    best_step = 0
    loss_start = float("nan")
    trace: list[float] = []
    bar = tqdm(
        range(settings.steps + 1),
        desc=description,
        leave=False,
        disable=not (progress and sys.stderr.isatty()),
    )
    # steps + 1 evaluations: the loss after the last update is a candidate too.
    for step in bar:
        rotation = orthogonal_from(free_rotation)
        blocks = orthogonal_from(free_blocks)
        loss = layer_loss(problem, rotation, blocks, settings.loss_variant)  # type: ignore[arg-type]
        value = float(loss.detach())
        trace.append(value)
        if not math.isfinite(value):
            log.warning("%s: non-finite loss at step %d; keeping the best iterate so far", description, step)
            break
        if step == 0:
            loss_start = value
        if value < best_loss:
            best_loss, best_step = value, step
            best = (rotation.detach().clone(), blocks.detach().clone())
        if step == settings.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(parameters, settings.clip)
        if not torch.isfinite(norm):
            log.warning("%s: non-finite gradient at step %d; stopping early", description, step)
            break
        optimizer.step()
        bar.set_postfix(loss=f"{value:.2f}", best=f"{best_loss:.2f}")

    return RotationResult(
        rotation=best[0],
        head_blocks=best[1],
        loss_start=loss_start,
        loss_best=best_loss,
        best_step=best_step,
        steps=settings.steps,
        seconds=time.perf_counter() - start,
        loss_trace=trace,
    )
