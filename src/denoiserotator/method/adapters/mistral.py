from __future__ import annotations

from denoiserotator.method.adapters.base import ModelAdapter


class MistralAdapter(ModelAdapter):
    """Mistral: LLaMA layout with sliding-window attention masks (passed through by the engine)."""

    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
