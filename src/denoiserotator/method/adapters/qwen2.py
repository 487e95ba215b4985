from __future__ import annotations

from denoiserotator.method.adapters.base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    """Qwen2 / Qwen2.5: like LLaMA but q, k, v carry biases (v's is rotated with R2)."""

    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
