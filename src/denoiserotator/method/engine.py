"""Layer-by-layer execution: capture what decoder layers receive, then run them one at a time.

Only one decoder layer and the calibration activations live on the compute device; the
rest of the model stays where it was loaded (CPU). Layer inputs are captured by swapping
the decoder layers for recorders during one pass of the base model, so every keyword
argument the family passes (masks, position embeddings, sliding-window masks per layer
type, cache flags) is recorded as the model itself builds it, without copying its code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from denoiserotator.method.adapters import ModelAdapter
from denoiserotator.method.config_scope import temporary_config
from denoiserotator.method.precision import fp32_modules, place


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer: records its inputs and passes hidden states through."""

    def __init__(self, layer: nn.Module, keep_kwargs: bool) -> None:
        super().__init__()
        self.wrapped = [layer]  # a list, so the layer is not registered as a child
        self.keep_kwargs = keep_kwargs
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped[0], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers are expected to receive everything but hidden_states by keyword")
        if self.hidden is None:
            self.hidden = hidden_states
        if self.keep_kwargs and self.kwargs is None:
            self.kwargs = dict(kwargs)
        return hidden_states


@dataclass
class LayerInputs:
    """Calibration activations (one tensor per batch) and the kwargs each layer receives."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]


def _base_model(adapter: ModelAdapter) -> nn.Module:
    return adapter.model.get_submodule(adapter.layers_path.rsplit(".", 1)[0])


@torch.no_grad()
def capture_layer_inputs(
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> LayerInputs:
    """One pass of the base model over `input_ids` (nsamples, seqlen) in batches of `batch_size`:
    the hidden states entering layer 0 (one (batch, seqlen, hidden) tensor per batch, on
    `device` in `dtype`) and the keyword arguments each layer receives (those of the first batch;
    all batches share a shape). The non-layer modules are placed with `precision.place`: their
    parameters in `dtype`, their buffers (rotary inv_freq) as the model keeps them."""
    layers = adapter.layers
    base = _base_model(adapter)
    originals = list(layers)
    base_path = adapter.layers_path.rsplit(".", 1)[0]
    keep = fp32_modules(adapter.model, dtype)
    # Everything in the base model but the decoder layers (embedding, rotary, norm) is small.
    # `place`, not `.to(dtype)`: the rotary embedding's inv_freq stays fp32 as in the model
    # loaded in `dtype`, so the captured position embeddings are the model's own.
    moved: list[nn.Module] = []
    for name, module in base.named_children():
        if name != "layers":
            moved.append(place(module, device, dtype, keep, prefix=f"{base_path}.{name}"))
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[dict[str, Any]] = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            recorders = [_LayerRecorder(layer, keep_kwargs=start == 0) for layer in originals]
            for index, recorder in enumerate(recorders):
                layers[index] = recorder
            # use_cache off for this pass only: the config is exported later and must keep its value.
            with temporary_config(adapter.model.config, use_cache=False):
                base(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
            hidden.append(recorders[0].hidden)
            if start == 0:
                layer_kwargs = [_detach_kwargs(recorder.kwargs or {}) for recorder in recorders]
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
        for module in moved:
            module.to("cpu")
    return LayerInputs(hidden=hidden, layer_kwargs=layer_kwargs)


def place_layer(
    adapter: ModelAdapter, index: int, device: torch.device | str | None, dtype: torch.dtype
) -> nn.Module:
    """Decoder layer `index` on `device` with its floating-point parameters in `dtype`, buffers
    and the model's keep-in-fp32 modules as the model keeps them (`precision.place`)."""
    return place(
        adapter.layers[index],
        device,
        dtype,
        fp32_modules(adapter.model, dtype),
        prefix=f"{adapter.layers_path}.{index}",
    )


def _detach_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("past_key_values", "cache", "past_key_value"):
            kept[key] = None
        else:
            kept[key] = value
    kept["use_cache"] = False
    return kept


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: Sequence[torch.Tensor], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    outputs = []
    for batch in hidden:
        output = layer(batch, **kwargs)
        outputs.append(output[0] if isinstance(output, tuple) else output)
    return outputs
