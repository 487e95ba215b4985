"""Fused linears (Phi-3's `qkv_proj`, `gate_up_proj`) held as their row blocks.

A fused linear stacks the output rows of several linears that share one input. The method
(true-sequential groups, R1/R2 fusion, the pruners, masks) works on the unfused linears, so a
family with fused weights is *split* in memory: the fused module is replaced by a `SplitLinear`
whose children are ordinary `nn.Linear`s, one per block of rows, and whose forward concatenates
their outputs in the stored order. Rows of a linear are independent (y_i = W_i·x), so the split
module computes exactly what the fused one does, and every pruner sees each block as it would
see the unfused model's linear: the per-row masks (Wanda, SparseGPT, N:M) are the same as on
the fused weight, and a per-matrix rule (Magnitude at 50%) ranks within each block, as it does
on LLaMA's separate q/k/v, rather than across the fused matrix.

The state dict of a `SplitLinear` is the fused one (`<path>.weight`, `<path>.bias`): exported
folders, checkpoints and the stock transformers class see the original layout, and loading a
fused state dict into a split module splits it again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SplitLinear(nn.Module):
    """A fused `nn.Linear` (out = Σ rows, in) as children named by `parts` (name → rows), in order."""

    def __init__(self, fused: nn.Linear, parts: dict[str, int]) -> None:
        super().__init__()
        if sum(parts.values()) != fused.out_features:
            raise ValueError(
                f"parts {parts} cover {sum(parts.values())} rows, the fused linear has {fused.out_features}"
            )
        self.part_names = tuple(parts)
        self.in_features = fused.in_features
        self.out_features = fused.out_features
        start = 0
        for name, rows in parts.items():
            part = nn.Linear(fused.in_features, rows, bias=fused.bias is not None, device="meta")
            part.weight = nn.Parameter(
                fused.weight.data[start : start + rows].clone(), requires_grad=fused.weight.requires_grad
            )
            if fused.bias is not None:
                part.bias = nn.Parameter(
                    fused.bias.data[start : start + rows].clone(), requires_grad=fused.bias.requires_grad
                )
            self.add_module(name, part)
            start += rows
        self.register_state_dict_post_hook(_fuse_state)
        self.register_load_state_dict_pre_hook(_split_state)

    def part(self, name: str) -> nn.Module:
        return self.get_submodule(name)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.part(name)(hidden) for name in self.part_names], dim=-1)


def _fuse_state(module: SplitLinear, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in module.part_names]
        # Under peft the blocks are wrapped (`<name>.base_layer.weight`, LoRA factors): left as is.
        if all(key in state for key in keys):
            state[f"{prefix}{kind}"] = torch.cat([state.pop(key) for key in keys])


def _split_state(module: SplitLinear, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    start = 0
    for name in module.part_names:
        rows = module.part(name).out_features
        for kind in ("weight", "bias"):
            fused = state.get(f"{prefix}{kind}")
            if fused is not None:
                state[f"{prefix}{name}.{kind}"] = fused[start : start + rows]
        start += rows
    for kind in ("weight", "bias"):
        state.pop(f"{prefix}{kind}", None)
