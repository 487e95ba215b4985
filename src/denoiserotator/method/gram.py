"""Hook-based accumulation of Gram matrices H = Σ_t x_t x_tᵀ of linear layers' inputs, or of only
their diagonals Σ_t x_t² (all Wanda reads: 2 · tokens · width work instead of 2 · tokens · width²)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class GramAccumulator:
    """Sums xᵀx over every token a linear sees, (in, in); with `diagonal`, only its diagonal Σ x²
    (in,), the squared input column norms. float64 on CPU (cheap there), float32 on GPU."""

    def __init__(self, features: int, device: torch.device, diagonal: bool = False) -> None:
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        shape = (features,) if diagonal else (features, features)
        self.gram = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).to(self.gram.dtype)
        if self.gram.dim() == 1:
            self.gram.add_(flat.square().sum(dim=0))
        else:
            self.gram.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]


@contextmanager
def collect_grams(
    linears: dict[str, nn.Linear], diagonal: bool = False
) -> Iterator[dict[str, GramAccumulator]]:
    """While active, every forward of the given linears adds its input to their Gram matrix
    (in, in), or with `diagonal` only to its diagonal (in,)."""
    accumulators: dict[str, GramAccumulator] = {}
    handles = []
    for name, linear in linears.items():
        accumulator = GramAccumulator(linear.in_features, linear.weight.device, diagonal)
        accumulators[name] = accumulator

        def hook(
            _module: nn.Module, args: tuple[torch.Tensor, ...], acc: GramAccumulator = accumulator
        ) -> None:
            acc.add(args[0].detach())

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
