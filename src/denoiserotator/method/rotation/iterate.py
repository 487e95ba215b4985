"""What every optimizer shares: the result of a layer's training, the best-iterate bookkeeping, the
loss it minimises."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from denoiserotator.logs import rotation_summary
from denoiserotator.method.rotation.fused_loss import FusedLayerLoss, bf16_products_for
from denoiserotator.method.rotation.orthogonal import (
    _orthonormalised,
    block_diagonal_mask,
    with_masked_gradient,
)
from denoiserotator.method.rotation.problem import LayerProblem, layer_loss
from denoiserotator.settings import RotationSettings

log = logging.getLogger(__name__)

# Stop reasons shared by the optimizers, as the per-layer lines print them.
STOP_BUDGET = "step budget"
STOP_PLATEAU = "plateau"


@dataclass
class RotationResult:
    rotation: torch.Tensor
    head_blocks: torch.Tensor
    loss_start: float
    loss_best: float
    best_step: int
    steps: int  # updates actually made (fewer than configured after an early stop)
    seconds: float
    loss_trace: list[float] = field(default_factory=list)  # loss at step 0..steps
    optimizer: str = "paper"
    evaluations: int = 0  # loss evaluations (line-search trials included)
    damping: float = 0.0  # largest relative damping of the SparseGPT statistics' inverses
    stop_reason: str = STOP_BUDGET

    def summary(self) -> dict[str, float | int | str]:
        return {
            "entropy_before": self.loss_start,
            "entropy_after": self.loss_best,
            "rotation_best_step": self.best_step,
            "rotation_steps": self.steps,
            "rotation_seconds": self.seconds,
            "rotation_optimizer": self.optimizer,
            "rotation_evaluations": self.evaluations,
            "rotation_damping": self.damping,
            "rotation_stop": self.stop_reason,
        }

    def log_line(self) -> str:
        """One readable line per layer, the pipeline's wording (`logs.rotation_summary`) plus the
        optimizer and time, e.g. `loss 812.3 → 640.1 (-21.2%), 137 steps (best at 130), stopped:
        plateau, optimizer cayley, 4.2 s`."""
        return f"{rotation_summary(self.summary())}, optimizer {self.optimizer}, {self.seconds:.1f} s"


# (step, rotation, blocks, loss) at every accepted iterate; returning True stops training.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, float], "bool | None"]


@dataclass
class _BestIterate:
    """The bookkeeping every optimizer shares: the loss trace, the starting loss and the best
    iterate seen (the identity is evaluated first, so it is a candidate too)."""

    best: tuple[torch.Tensor, torch.Tensor]
    description: str
    best_loss: float = float("inf")
    best_step: int = 0
    loss_start: float = float("nan")
    trace: list[float] = field(default_factory=list)

    def see(self, step: int, value: float, rotation: torch.Tensor, blocks: torch.Tensor) -> bool | None:
        """Record the loss of iterate `step`: True if it is a new best (kept as a copy), False if
        not, None if it is not finite (logged; the caller stops)."""
        self.trace.append(value)
        if not math.isfinite(value):
            log.warning("%s: non-finite loss at step %d; keeping the best so far", self.description, step)
            return None
        if step == 0:
            self.loss_start = value
        if value >= self.best_loss:
            return False
        self.best_loss, self.best_step = value, step
        self.best = (rotation.detach().clone(), blocks.detach().clone())
        return True

    def result(self, optimizer: str, steps: int, started: float, stop: str) -> RotationResult:
        # float32 iterates drift from orthogonality (Cayley products by ~1e-6 between
        # re-orthonormalisations); what is fused into the weights is orthogonal in float64.
        return RotationResult(
            rotation=_orthonormalised(self.best[0].to(torch.float64)),
            head_blocks=_orthonormalised(self.best[1].to(torch.float64)),
            loss_start=self.loss_start,
            loss_best=self.best_loss,
            best_step=self.best_step,
            steps=steps,
            seconds=time.perf_counter() - started,
            loss_trace=self.trace,
            optimizer=optimizer,
            evaluations=len(self.trace),
            stop_reason=stop,
        )


def _loss_function(problem: LayerProblem, settings: RotationSettings):
    """The loss the fast optimisers evaluate: fused for the paper variant (same function),
    the straightforward bf16 one for the reference variant."""
    device = problem.weights["q"].device
    if settings.loss_variant == "paper":
        loss = FusedLayerLoss(problem, bf16_products=bf16_products_for(settings.matmul_precision, device))
    else:
        loss = lambda rotation, blocks: layer_loss(problem, rotation, blocks, settings.loss_variant)  # noqa: E731
    if settings.r1_blocks == 1:
        return loss
    mask = block_diagonal_mask(problem.weights["q"].shape[1], settings.r1_blocks, device)
    return lambda rotation, blocks: loss(with_masked_gradient(rotation, mask), blocks)
