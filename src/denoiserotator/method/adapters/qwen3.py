from __future__ import annotations

from denoiserotator.method.adapters.base import ModelAdapter


class Qwen3Adapter(ModelAdapter):
    """Qwen3 (dense): the LLaMA layout plus a per-head RMSNorm on queries and keys.

    `q_norm`/`k_norm` act on each head's `head_dim` slice of q_proj/k_proj's *output*, before
    RoPE. R1 rotates q_proj/k_proj's input side only (W ↦ W·Q, with the input norm's scale folded
    in first), so their outputs, and everything q_norm/k_norm see, are unchanged: R1 stays exact
    and the two norms keep their weights. R2 rotates only v_proj's output and o_proj's input,
    which no norm touches. Tied and untied embeddings follow the common path (untied before the
    boundary rotations are folded in).
    """

    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
