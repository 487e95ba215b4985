"""Checks that run before work is spent, and finiteness checks at every place data enters a step.

Two kinds, one family of errors (`CheckError`, a ValueError):

- `SettingError`: a setting is out of range, or does not fit the model (head counts, N:M
  group size against the linears' input widths, an unavailable device). Raised by
  `check_settings` (settings alone; cheap, before anything is loaded) and `preflight`
  (settings against the loaded model; before calibration activations are captured).
- `NonFiniteError`: an inf/NaN in a decoder layer's input or in a linear's Gram matrix,
  named at its cause (which layer's input, which linear's statistics, which calibration
  tokens) before that layer is rotated or pruned.

Bounds of single settings are the settings classes' own (denoiserotator.settings, the same
source as the config schema).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from denoiserotator.settings import SettingsError

__all__ = [
    "CheckError",
    "NonFiniteError",
    "SettingError",
    "check_grams",
    "check_layer_input",
    "check_layer_output",
    "check_layer_weights",
    "check_settings",
    "preflight",
]


class CheckError(ValueError):
    """A run was refused before (or instead of) spending work on inputs that cannot succeed."""


class SettingError(CheckError, SettingsError):
    """A setting is invalid by itself or for this model. The message names the setting,
    where it applies and the allowed values."""


class NonFiniteError(CheckError):
    """Calibration activations or statistics contain inf/NaN."""


def _advice(dtype: torch.dtype | None) -> str:
    parts = []
    if dtype == torch.float16:
        parts.append(
            "the compute dtype is float16, whose range (max 65504) activations of large models "
            "exceed: use --dtype bfloat16 (or float32) instead"
        )
    parts.append(
        "inspect the calibration data and the source model's weights (a non-finite embedding row "
        "or weight, or a corrupted download, shows here)"
    )
    return "; ".join(parts)


# --- settings -----------------------------------------------------------------------------


def check_settings(settings: Any) -> None:
    """What the settings classes cannot know by themselves: whether the compute device exists on
    this machine. `settings` is a pipeline.PruneSettings; the classes in denoiserotator.settings
    check every value's type and bounds when they are built. Raises SettingError."""
    _check_device(settings.compute.resolved_device())


def _check_device(spec: str) -> None:
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as error:
        raise SettingError(
            f"setting device: {spec!r} is not a device ('cpu', 'cuda', 'cuda:1', ...)"
        ) from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(
                f"setting device = {spec!r}: CUDA is not available on this machine "
                "(no GPU visible, or torch built without CUDA); use --device cpu or run on a GPU node"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SettingError(
                f"setting device = {spec!r}: only {count} CUDA device(s) visible; allowed: "
                + ", ".join(f"cuda:{i}" for i in range(count))
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SettingError(
                f"setting device = {spec!r}: MPS is not available on this machine; use --device cpu"
            )
    elif device.type != "cpu":
        raise SettingError(f"setting device = {spec!r}: unsupported device type; use cpu or cuda")


# --- settings against the model -----------------------------------------------------------


def _divisors(value: int) -> list[int]:
    return [d for d in range(2, value + 1) if value % d == 0]


def preflight(settings: Any, adapter: Any) -> None:
    """Check the settings against the model's config and shapes. Raises SettingError.

    Runs before calibration activations are captured: everything checked here would otherwise
    fail (or silently go wrong) after hours of work on a large model.
    """
    from denoiserotator.method.adapters import LINEAR_NAMES
    from denoiserotator.method.pruners import parse_pattern

    check_settings(settings)
    heads, kv_heads, head_dim = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise SettingError(
            f"model config: num_attention_heads = {heads} is not a multiple of num_key_value_heads = "
            f"{kv_heads} (self_attn); allowed num_key_value_heads: divisors of {heads}"
        )
    hidden = adapter.hidden_size
    expected_out = {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim, "o": hidden}
    expected_in = {"q": hidden, "k": hidden, "v": hidden, "o": heads * head_dim, "gate": hidden, "up": hidden}
    widths: dict[str, int] = {}
    for index in range(adapter.num_layers):
        layer = adapter.layer(index)
        for name in LINEAR_NAMES:
            linear = layer.linear(name)
            path = f"layer {index} {layer.linear_paths[name]}"
            out_features, in_features = linear.weight.shape
            if name in expected_out and out_features != expected_out[name]:
                raise SettingError(
                    f"model config vs {path}: {out_features} outputs, but num_attention_heads = {heads}, "
                    f"num_key_value_heads = {kv_heads}, head_dim = {head_dim} imply {expected_out[name]}"
                )
            if name in expected_in and in_features != expected_in[name]:
                raise SettingError(
                    f"model config vs {path}: {in_features} inputs, "
                    f"but the config implies {expected_in[name]}"
                )
            widths[path] = in_features
    blocks = settings.rotation.r1_blocks if settings.rotation is not None else 1
    if hidden % blocks:
        raise SettingError(
            f"setting rotation.r1_blocks = {blocks}: it does not divide the hidden size {hidden}; "
            f"allowed: 1, {', '.join(map(str, _divisors(hidden)))}"
        )
    if settings.pruner != "none":
        pattern = parse_pattern(settings.pattern)
        if pattern.is_nm:
            m = int(pattern.m)
            bad = {path: width for path, width in widths.items() if width % m}
            if bad:
                path, width = next(iter(bad.items()))
                common = math.gcd(*widths.values())
                raise SettingError(
                    f"setting pattern = {settings.pattern!r}: M = {m} does not divide the input "
                    f"width {width} of {path} ({len(bad)} pruned linear(s) affected); "
                    f"allowed M for this model: "
                    f"{', '.join(map(str, _divisors(common)))}"
                )


# --- finiteness ---------------------------------------------------------------------------


def _first_bad_positions(hidden: Sequence[torch.Tensor], limit: int = 5) -> tuple[list[tuple[int, int]], int]:
    """(sample, token) positions whose hidden vector is not finite, and how many there are in all."""
    positions: list[tuple[int, int]] = []
    total = 0
    offset = 0
    for batch in hidden:
        bad = ~torch.isfinite(batch).all(dim=-1)  # (batch, seq)
        count = int(bad.sum())
        if count:
            total += count
            for sample, token in bad.nonzero().tolist():
                if len(positions) < limit:
                    positions.append((offset + sample, token))
        offset += batch.shape[0]
    return positions, total


def check_layer_input(
    hidden: Sequence[torch.Tensor],
    index: int,
    input_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Raise NonFiniteError if decoder layer `index`'s calibration input holds inf/NaN.

    For layer 0 the input is the embedding of the calibration tokens; given `input_ids`, the
    message names the token ids whose embedding is not finite.
    """
    if all(bool(torch.isfinite(batch).all()) for batch in hidden):
        return
    positions, total = _first_bad_positions(hidden)
    where = ", ".join(f"sample {s} token {t}" for s, t in positions)
    source = f"the output of layer {index - 1}" if index else "the embedding of the calibration tokens"
    detail = ""
    if index == 0 and input_ids is not None:
        ids = sorted({int(input_ids[s, t]) for s, t in positions})
        detail = f"; token id(s) {ids} have a non-finite embedding row (model.embed_tokens)"
    raise NonFiniteError(
        f"non-finite values in the input of decoder layer {index} ({source}) at {total} position(s), "
        f"first at {where}{detail}; nothing of layer {index} was rotated or pruned. "
        f"What to do: {_advice(dtype)}"
    )


def check_layer_weights(layer: torch.nn.Module, index: int) -> None:
    """Raise NonFiniteError if any parameter of decoder layer `index` holds inf/NaN (a corrupt source)."""
    for name, param in layer.named_parameters():
        if not bool(torch.isfinite(param).all()):
            count = int((~torch.isfinite(param)).sum())
            raise NonFiniteError(
                f"non-finite weights in layer {index} {name}: {count} of {param.numel()} values are inf/NaN "
                f"in the model as loaded; nothing of layer {index} was rotated or pruned. What to do: check "
                "the source model folder (re-download or re-convert it); in float16, a weight beyond 65504 "
                "overflows on loading: use bfloat16"
            )


def check_grams(
    grams: Mapping[str, torch.Tensor | None],
    index: int,
    paths: Mapping[str, str] | None = None,
    purpose: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """Raise NonFiniteError if the Gram matrix (input statistics; (in, in), or its diagonal (in,))
    of any linear holds inf/NaN."""
    for name, gram in grams.items():
        if gram is None or bool(torch.isfinite(gram).all()):
            continue
        path = (paths or {}).get(name, name)
        diagonal = gram if gram.dim() == 1 else torch.diagonal(gram)
        bad_inputs = (~torch.isfinite(diagonal)).nonzero().flatten().tolist()[:5]
        raise NonFiniteError(
            f"non-finite Gram matrix (input statistics) of layer {index} {path}"
            + (f", collected for {purpose}" if purpose else "")
            + f": the inputs of this linear overflowed inside layer {index} "
            f"(first input channels {bad_inputs}) although the layer's input was finite; "
            f"the run stopped before using these statistics. "
            f"What to do: {_advice(dtype)}"
        )


def check_linear_inputs(
    names: Sequence[str],
    index: int,
    paths: Mapping[str, str] | None = None,
    purpose: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """Raise NonFiniteError naming the first of `names`, linears of layer `index` whose inputs
    held inf/NaN although the layer's input was finite (seen while collecting `purpose`)."""
    if not names:
        return
    path = (paths or {}).get(names[0], names[0])
    raise NonFiniteError(
        f"non-finite inputs of layer {index} {path}"
        + (f", seen while collecting statistics for {purpose}" if purpose else "")
        + f": the inputs of this linear overflowed inside layer {index} although the layer's input "
        f"was finite; the run stopped before any work on this layer. What to do: {_advice(dtype)}"
    )


def check_layer_output(hidden: Sequence[torch.Tensor], index: int, dtype: torch.dtype | None = None) -> None:
    """Raise NonFiniteError if decoder layer `index` produced inf/NaN from finite inputs."""
    if all(bool(torch.isfinite(batch).all()) for batch in hidden):
        return
    positions, total = _first_bad_positions(hidden)
    where = ", ".join(f"sample {s} token {t}" for s, t in positions)
    raise NonFiniteError(
        f"non-finite activations in the output of decoder layer {index} at {total} position(s), first at "
        f"{where}, from a finite input: the layer overflowed. What to do: {_advice(dtype)}"
    )
