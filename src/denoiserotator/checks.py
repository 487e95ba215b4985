"""Checks that run before work is spent, and finiteness checks at every place data enters a step.

Two kinds, one family of errors (`CheckError`, a ValueError):

- `SettingError`: a setting is out of range, or does not fit the model (head counts, N:M
  group size against the linears' input widths, an unavailable device). Raised by
  `check_settings` (settings alone; cheap, before anything is loaded) and `preflight`
  (settings against the loaded model; before calibration activations are captured).
- `NonFiniteError`: an inf/NaN in a decoder layer's input or in a linear's Gram matrix,
  named at its cause (which layer's input, which linear's statistics, which calibration
  tokens) before that layer is rotated or pruned.

The numeric bounds in `BOUNDS` are the ones workflow/schemas/config.schema.yaml states for the
same settings; tests/test_checks.py keeps the two in agreement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "BOUNDS",
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

# setting -> (kind, bound): kind "minimum" (value >= bound) or "exclusiveMinimum" (value > bound),
# the JSON-schema vocabulary, so the schema test can compare them one to one.
BOUNDS: dict[str, tuple[str, float]] = {
    "steps": ("minimum", 0),
    "lr": ("exclusiveMinimum", 0),
    "clip": ("exclusiveMinimum", 0),
    "percdamp": ("exclusiveMinimum", 0),
    "sparsegpt_blocksize": ("minimum", 1),
    "batch_size": ("minimum", 1),
}
INTEGER_SETTINGS = ("steps", "sparsegpt_blocksize", "batch_size", "seed")
LOSS_VARIANTS: tuple[str, ...] = ("paper", "reference")
ROTATIONS: tuple[str, ...] = ("none", "denoise")


class CheckError(ValueError):
    """A run was refused before (or instead of) spending work on inputs that cannot succeed."""


class SettingError(CheckError):
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


def _bound_ok(value: float, kind: str, bound: float) -> bool:
    return value >= bound if kind == "minimum" else value > bound


def _bound_text(kind: str, bound: float) -> str:
    return f">= {bound:g}" if kind == "minimum" else f"> {bound:g}"


def check_settings(settings: Any) -> None:
    """Validate the settings on their own (no model needed). Raises SettingError.

    `settings` is a pipeline.PruneSettings (read by attribute name).
    """
    from .pipeline import DTYPES
    from .pruners import PRUNERS, parse_pattern
    from .rotation.loss import SCORES

    pruners = (*PRUNERS, "none")
    if settings.pruner not in pruners:
        raise SettingError(
            f"setting pruner: unknown pruner {settings.pruner!r}; choose from {', '.join(pruners)}"
        )
    if settings.rotation not in ROTATIONS:
        raise SettingError(
            f"setting rotation: unknown rotation {settings.rotation!r}; choose from {', '.join(ROTATIONS)}"
        )
    if settings.pruner == "none" and settings.rotation == "none":
        raise SettingError(
            "settings pruner/rotation: nothing to do: pruner 'none' with rotation 'none' is the dense model"
        )
    if settings.pruner != "none":
        if settings.pattern is None:
            raise SettingError(f"setting pattern: pruner {settings.pruner!r} needs a sparsity pattern")
        try:
            parse_pattern(settings.pattern)
        except ValueError as error:
            raise SettingError(
                f"setting pattern: {error}; allowed: a percentage strictly between 0 and 100 ('50%') "
                "or N:M with 1 <= N < M ('2:4')"
            ) from error
    for name in INTEGER_SETTINGS:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"setting {name}: must be an integer, got {value!r}")
    for name, (kind, bound) in BOUNDS.items():
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingError(f"setting {name}: must be a number {_bound_text(kind, bound)}, got {value!r}")
        if not math.isfinite(value) or not _bound_ok(value, kind, bound):
            where = {
                "steps": "rotation training (Adam steps per layer)",
                "lr": "rotation training (Adam learning rate)",
                "clip": "rotation training (gradient-norm clip)",
                "percdamp": "SparseGPT pruning and the SparseGPT rotation loss (relative damping of H)",
                "sparsegpt_blocksize": "SparseGPT pruning (columns per block)",
                "batch_size": "calibration batches (sequences per forward)",
            }[name]
            raise SettingError(
                f"setting {name} = {value!r} for {where}: allowed values are {_bound_text(kind, bound)}"
            )
    if settings.loss_variant not in LOSS_VARIANTS:
        raise SettingError(
            f"setting loss_variant: unknown variant {settings.loss_variant!r} of the rotation loss; "
            f"choose from {', '.join(LOSS_VARIANTS)}"
        )
    if settings.rotation == "denoise":
        score = settings.resolved_loss_score
        if score not in SCORES:
            raise SettingError(
                f"setting loss_score: {score!r} is not a score of the rotation loss; "
                f"choose from {', '.join(SCORES)}"
            )
    elif settings.loss_score:
        raise SettingError(
            f"setting loss_score = {settings.loss_score!r} has no effect with rotation 'none' "
            "(it selects the score of the rotation loss); leave it unset or use rotation 'denoise'"
        )
    if settings.dtype not in DTYPES:
        raise SettingError(
            f"setting dtype: unknown dtype {settings.dtype!r}; choose from {', '.join(DTYPES)}"
        )
    _check_device(settings.device)


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
    from .adapters import LINEAR_NAMES
    from .pruners import parse_pattern

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
    """Raise NonFiniteError if the Gram matrix (input statistics) of any linear holds inf/NaN."""
    for name, gram in grams.items():
        if gram is None or bool(torch.isfinite(gram).all()):
            continue
        path = (paths or {}).get(name, name)
        diagonal = torch.diagonal(gram)
        bad_inputs = (~torch.isfinite(diagonal)).nonzero().flatten().tolist()[:5]
        raise NonFiniteError(
            f"non-finite Gram matrix (input statistics) of layer {index} {path}"
            + (f", collected for {purpose}" if purpose else "")
            + f": the inputs of this linear overflowed inside layer {index} "
            f"(first input channels {bad_inputs}) although the layer's input was finite; "
            f"the run stopped before using these statistics. "
            f"What to do: {_advice(dtype)}"
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
