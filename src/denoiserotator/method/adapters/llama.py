from __future__ import annotations

from denoiserotator.method.adapters.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """LLaMA-2/3/3.x (and SmolLM2): RMSNorm, GQA, SwiGLU, optional tied embeddings."""

    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
