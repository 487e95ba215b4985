"""Adapter registry, keyed by the config's architecture (then model_type)."""

from __future__ import annotations

from torch import nn

from denoiserotator.method.adapters.base import INPUT_GROUPS, LINEAR_NAMES, LayerAdapter, ModelAdapter
from denoiserotator.method.adapters.llama import LlamaAdapter
from denoiserotator.method.adapters.mistral import MistralAdapter
from denoiserotator.method.adapters.qwen2 import Qwen2Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, Qwen2Adapter, MistralAdapter)
# One family per adapter, named by its first model_type: the `tiny:<family>` sources, and the
# families every contract test runs on (denoiserotator.testing builds a tiny config of each).
FAMILIES: tuple[str, ...] = tuple(adapter.model_types[0] for adapter in ADAPTERS)


class UnsupportedArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return [arch for adapter in ADAPTERS for arch in adapter.architectures]


def adapter_class_for_config(config: object) -> type[ModelAdapter]:
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
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
    "UnsupportedArchitectureError",
    "adapter_class_for_config",
    "get_adapter",
    "supported_architectures",
]
