"""One layer's rotation problem: its weights and input statistics, and the entropy loss of a rotation
(SPEC §3-4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denoiserotator.method.rotation.fuse import block_diag, expand_kv_blocks
from denoiserotator.method.rotation.loss import (
    InputStatistic,
    LossVariant,
    ScoreName,
    linear_entropy,
)


def loss_statistic_inputs(variant: LossVariant = "paper") -> dict[str, str]:
    """The linears whose input statistics the loss needs, by the column factor they define.

    down_proj is rotated on its output side only, so its groups are columns and a per-column
    factor cancels in each column's normalisation (SPEC §3): the paper variant never builds its
    Gram (intermediate², the layer's largest) nor, for SparseGPT, its inverse. The reference
    variant keeps it, because the reference code applies it in bf16, where it changes the rounding.
    """
    needed = {"attn": "q", "o": "o", "mlp": "gate"}
    return {**needed, "down": "down"} if variant == "reference" else needed


@dataclass
class LayerProblem:
    """Frozen, norm-folded weights of one layer and the input statistics of its linears.
    `row_block`: M of the N:M-aware loss (`linear_entropy`'s `block`; 0 = the paper's loss)."""

    weights: dict[str, torch.Tensor]
    inputs: dict[str, InputStatistic]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    row_block: int = 0

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
        row_block: int = 0,
    ) -> LayerProblem:
        """`grams` holds the Gram matrix of the inputs of the linears in
        `loss_statistic_inputs(variant)`, keyed by linear name (others are ignored)."""
        inputs = {
            key: InputStatistic.from_gram(score, grams.get(name), variant=variant, percdamp=percdamp)
            for key, name in loss_statistic_inputs(variant).items()
        }
        inputs.setdefault("down", InputStatistic(score, None, variant=variant))  # it would cancel
        return cls(
            {name: weight.detach().to(torch.float32) for name, weight in weights.items()},
            inputs,
            num_heads,
            num_kv_heads,
            head_dim,
            row_block,
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
    """SPEC §3 layer loss: the plain sum of the group entropies of the seven linears fused with
    R1 `rotation` (d, d) and the R2 `blocks` (n_kv, d_head, d_head); no weights, no regulariser.
    A 0-d tensor in fp32 (fp64 when the rotation is; bf16 arithmetic for `variant="reference"`)."""
    # float32 as the paper; float64 when the rotation is (tests compare implementations there).
    if variant == "reference":
        compute_dtype = torch.bfloat16
    else:
        compute_dtype = torch.promote_types(torch.float32, rotation.dtype)
    weight = {name: w.to(compute_dtype) for name, w in problem.weights.items()}
    r1 = rotation.to(compute_dtype)
    r2v = block_diag(blocks).to(compute_dtype)
    r2o = block_diag(expand_kv_blocks(blocks, problem.num_heads)).to(compute_dtype)

    factors = {
        "attn": problem.inputs["attn"].column_factor(rotation),
        "o": problem.inputs["o"].column_factor(block_diag(expand_kv_blocks(blocks, problem.num_heads))),
        "mlp": problem.inputs["mlp"].column_factor(rotation),
        "down": problem.inputs["down"].column_factor(None),
    }
    factors = {key: None if f is None else f.to(compute_dtype) for key, f in factors.items()}

    # SPEC §2 fusion: q, k, gate, up: W R1; v: R2vᵀ W R1; o: R1ᵀ W R2o; down: R1ᵀ W.
    # Groups (SPEC §3): rows for an input-side rotation, columns for an output-side one.
    # The N:M-aware loss (`row_block`) changes the row groups only.
    block = problem.row_block
    loss = linear_entropy(weight["q"] @ r1, factors["attn"], rows=True, columns=False, block=block)
    loss = loss + linear_entropy(weight["k"] @ r1, factors["attn"], rows=True, columns=False, block=block)
    v, o = r2v.T @ weight["v"] @ r1, r1.T @ weight["o"] @ r2o
    loss = loss + linear_entropy(v, factors["attn"], rows=True, columns=True, block=block)
    loss = loss + linear_entropy(o, factors["o"], rows=True, columns=True, block=block)
    loss = loss + linear_entropy(weight["gate"] @ r1, factors["mlp"], rows=True, columns=False, block=block)
    loss = loss + linear_entropy(weight["up"] @ r1, factors["mlp"], rows=True, columns=False, block=block)
    loss = loss + linear_entropy(r1.T @ weight["down"], factors["down"], rows=False, columns=True)
    return loss.to(torch.promote_types(torch.float32, compute_dtype))
