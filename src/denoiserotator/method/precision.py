"""Moving (parts of) a model to the compute device and dtype the way the model itself keeps them.

`module.to(dtype=torch.bfloat16)` casts every floating-point tensor, buffers included. A model
loaded with `from_pretrained(..., dtype=torch.bfloat16)` does not: the rotary embedding's
`inv_freq` (and `original_inv_freq`) stay float32 — transformers builds them in float32 and only
the checkpoint's parameters are loaded in the requested dtype — and the modules a class lists in
`_keep_in_fp32_modules_strict` (fp16 and bf16) or `_keep_in_fp32_modules` (fp16 only) keep fp32
parameters. Rounding `inv_freq` to bf16 shifts every RoPE phase by up to position·ε·inv_freq,
radians by position 2047 at rope_theta 5e5–1e6, so calibrating on such a copy fits rotations,
masks and Gram matrices to another function than the one evaluated. `place` is the one way this
package moves model parts: floating-point parameters are cast, buffers only move.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn


def fp32_modules(model: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Names (dotted components) of the modules `model` keeps in float32 when loaded in `dtype`.

    Mirrors transformers' `from_pretrained` dtype plan: `_keep_in_fp32_modules_strict` for
    fp16/bf16, `_keep_in_fp32_modules` for fp16 only. Empty for fp32/fp64 and for plain modules.
    """
    attributes = []
    if dtype in (torch.float16, torch.bfloat16):
        attributes.append("_keep_in_fp32_modules_strict")
    if dtype == torch.float16:
        attributes.append("_keep_in_fp32_modules")
    names: set[str] = set()
    for attribute in attributes:
        # transformers 5 copies the class's list onto the instance in __init__ (merged with its
        # submodels'); a model turned into a Rotated* class in place keeps that old instance
        # copy, so the class's own list is read too.
        names.update(getattr(model, attribute, None) or ())
        names.update(getattr(type(model), attribute, None) or ())
    return tuple(sorted(names))


def _kept_fp32(name: str, keep: Iterable[str]) -> bool:
    # transformers matches a key as whole dotted components of the parameter's name.
    return any(re.search(rf"(^|\.){re.escape(key)}($|\.)", name) for key in keep)


@torch.no_grad()
def place(
    module: nn.Module,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    keep_fp32: Iterable[str] = (),
    prefix: str = "",
) -> nn.Module:
    """Move `module` to `device` and cast its floating-point *parameters* to `dtype`, in place.

    Buffers (rotary `inv_freq`, a `RotatedLayer`'s rotation) move to `device` but keep their
    dtype, as a model loaded in `dtype` keeps them. Parameters whose full name (`prefix` + "." +
    name inside `module`) contains a module named in `keep_fp32` (see `fp32_modules`) are not
    cast either. Parameter objects are kept (their `.data` is replaced), so hooks and optimiser
    references stay valid. Returns `module`.
    """
    keep = tuple(keep_fp32)
    if device is not None:
        module.to(device=device)  # device only: no dtype change to anything
    if dtype is None:
        return module
    for name, parameter in module.named_parameters(prefix=prefix, remove_duplicate=True):
        if not parameter.is_floating_point() or parameter.dtype == dtype:
            continue
        if _kept_fp32(name, keep):
            continue
        parameter.data = parameter.data.to(dtype)
    return module
