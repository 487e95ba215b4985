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
from denoiserotator.method.adapters.gemma3 import Gemma3Adapter
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
    Gemma3Adapter,
)
# One family per adapter, named by its first model_type: the `tiny:<family>` sources, and the
# families every contract test runs on (denoiserotator.testing builds a tiny config of each).
FAMILIES: tuple[str, ...] = tuple(adapter.model_types[0] for adapter in ADAPTERS)


# Families that load in transformers but that this package does not rotate, with the reason;
# planning refuses them (`plan.families`), as does every stage.
REFUSED: dict[str, str] = {
    "Gemma3ForConditionalGeneration": (
        "a multimodal checkpoint (vision tower, text decoder under model.language_model); only the "
        "text-only Gemma3ForCausalLM (e.g. gemma-3-1b) is supported; see docs/extending.md"
    ),
    "Gemma2ForCausalLM": (
        "Gemma 2 (sandwich norms as Gemma 3, plus logit soft-capping) has no adapter and contract "
        "test yet; see docs/extending.md"
    ),
}
REFUSED_MODEL_TYPES: dict[str, str] = {
    "gemma3": REFUSED["Gemma3ForConditionalGeneration"],
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
