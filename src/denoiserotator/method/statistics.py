"""A layer's input statistics: Gram matrices (or their diagonals) of its linears' inputs, collected by
hooks and checked finite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from denoiserotator.method.adapters import LayerAdapter
from denoiserotator.method.checks import (
    check_grams,
    check_linear_inputs,
)
from denoiserotator.method.gram import collect_grams

# ---------------------------------------------------------------------------------------------
# the steps of one layer


class _InputsCollected(Exception):
    """Raised by a forward pre-hook once every linear of interest has received its input."""


@torch.no_grad()
def input_statistics(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    names: tuple[str, ...],
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    until: tuple[str, ...] = (),
    diagonal: bool = False,
) -> dict[str, torch.Tensor]:
    """Gram matrices H = Σ_t x_t x_tᵀ (in, in) of the inputs of `names`, running `hidden` through
    `layer`; with `diagonal`, only their diagonals Σ_t x_t² (in,), all Wanda reads.

    Each batch's forward stops at the entry of the last of `names` and `until` (linears whose
    inputs other pre-hooks, registered before this call, inspect) it reaches: nothing after it
    is needed, so the first group of a layer costs its input norm instead of a whole forward
    (`flops.input_statistics` counts the same)."""
    awaited = frozenset(names) | frozenset(until)
    entered: set[str] = set()

    def stop_when_all_entered(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
            entered.add(name)
            if entered >= awaited:
                raise _InputsCollected

        return hook

    with collect_grams({name: linears[name] for name in names}, diagonal) as accumulators:
        # registered after the Gram hooks (and the caller's), so those run first on the last input
        handles = [linears[name].register_forward_pre_hook(stop_when_all_entered(name)) for name in awaited]
        try:
            for batch in hidden:
                entered.clear()
                try:
                    layer(batch, **kwargs)
                except _InputsCollected:
                    pass
        finally:
            for handle in handles:
                handle.remove()
    return {name: acc.gram for name, acc in accumulators.items()}


def checked_statistics(
    view: LayerAdapter,
    index: int,
    names: tuple[str, ...],
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    purpose: str,
    watch: tuple[str, ...] = (),
    diagonal: bool = False,
) -> dict[str, torch.Tensor]:
    """`input_statistics` of layer `index`'s linears `names` (only the Grams' diagonals with
    `diagonal`), refused with NonFiniteError (naming
    the layer, the linear and `purpose`) when a Gram holds inf/NaN, before anything uses it.
    The inputs of the linears `watch` are only checked for inf/NaN in the same pass (no Gram), so
    an overflow there is named before any work too."""
    linears = view.linears()
    overflowed: list[str] = []

    def finite_check(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if name not in overflowed and not bool(torch.isfinite(args[0]).all()):
                overflowed.append(name)

        return hook

    handles = [linears[name].register_forward_pre_hook(finite_check(name)) for name in watch]
    try:
        grams = input_statistics(view.layer, linears, names, hidden, kwargs, until=watch, diagonal=diagonal)
    finally:
        for handle in handles:
            handle.remove()
    check_grams(grams, index, view.linear_paths, purpose, hidden[0].dtype)
    check_linear_inputs(overflowed, index, view.linear_paths, purpose, hidden[0].dtype)
    return grams
