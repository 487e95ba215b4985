"""Adapter registry, keyed by the config's architecture (then model_type)."""

from __future__ import annotations

from torch import nn

from denoiserotator.method.adapters.base import (
    INPUT_GROUPS,
    LINEAR_NAMES,
    LayerAdapter,
    ModelAdapter,
    linear_rows,
)
from denoiserotator.method.adapters.llama import LlamaAdapter
from denoiserotator.method.adapters.mistral import MistralAdapter
from denoiserotator.method.adapters.phi3 import Phi3Adapter
from denoiserotator.method.adapters.qwen2 import Qwen2Adapter
from denoiserotator.method.adapters.qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter,
    Qwen2Adapter,
    MistralAdapter,
    Qwen3Adapter,
    Phi3Adapter,
)
# One family per adapter, named by its first model_type: the `tiny:<family>` sources, and the
# families every contract test runs on (denoiserotator.testing builds a tiny config of each).
FAMILIES: tuple[str, ...] = tuple(adapter.model_types[0] for adapter in ADAPTERS)


# Families that load in transformers but that this package cannot rotate exactly (yet), with the
# reason; planning refuses them (`plan.experiment`), as does every stage.
_GEMMA3 = (
    "Gemma 3 normalises each sublayer's output before the residual add (post_attention_layernorm, "
    "post_feedforward_layernorm: RMSNorm with scale 1 + γ). R1 rotates the residual stream, and a "
    "rotation commutes with the weightless RMS but not with diag(1 + γ): staying exact needs each "
    "such norm to become the d×d matrix Qᵀ·diag(1 + γ)·Q (two extra d×d products per token and "
    "layer in the exported model), which is not implemented; see docs/extending.md"
)
REFUSED: dict[str, str] = {
    "Gemma3ForCausalLM": _GEMMA3,
    "Gemma3ForConditionalGeneration": _GEMMA3,
    "Gemma2ForCausalLM": _GEMMA3.replace("Gemma 3", "Gemma 2"),
}
REFUSED_MODEL_TYPES: dict[str, str] = {
    "gemma3_text": _GEMMA3,
    "gemma3": _GEMMA3,
    "gemma2": REFUSED["Gemma2ForCausalLM"],
}


class UnsupportedArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return [arch for adapter in ADAPTERS for arch in adapter.architectures]


def adapter_class_for_config(config: object) -> type[ModelAdapter]:
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    for arch in architectures:
        if arch in REFUSED:
            raise UnsupportedArchitectureError(f"architecture {arch} is refused: {REFUSED[arch]}")
    if not architectures and model_type in REFUSED_MODEL_TYPES:
        reason = REFUSED_MODEL_TYPES[model_type]
        raise UnsupportedArchitectureError(f"model_type {model_type!r} is refused: {reason}")
    for adapter in ADAPTERS:
        if any(arch in adapter.architectures for arch in architectures):
            return adapter
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"unsupported architecture {architectures or None} (model_type {model_type!r}); "
        f"supported: {', '.join(supported_architectures())}"
    )


def get_adapter(model: nn.Module) -> ModelAdapter:
    return adapter_class_for_config(model.config)(model)


__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "INPUT_GROUPS",
    "LINEAR_NAMES",
    "LayerAdapter",
    "ModelAdapter",
    "REFUSED",
    "UnsupportedArchitectureError",
    "adapter_class_for_config",
    "get_adapter",
    "linear_rows",
    "supported_architectures",
]
