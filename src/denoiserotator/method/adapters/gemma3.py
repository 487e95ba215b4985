from __future__ import annotations

from denoiserotator.method.adapters.base import ModelAdapter


class Gemma3Adapter(ModelAdapter):
    """Gemma 3, text-only (`Gemma3ForCausalLM`, e.g. gemma-3-1b): sandwich norms, scale 1 + γ.

    What differs from LLaMA, and why the rotations stay exact:
    - RMSNorm scales are 1 + weight (`norm_offset`): folding moves 1 + γ into the next linears and
      leaves weight 0, a weightless RMS that commutes with R1.
    - The MLP's pre-norm is `pre_feedforward_layernorm`; `post_attention_layernorm` and
      `post_feedforward_layernorm` normalise the sublayer *outputs* before the residual add.
      Those receive the rotated yQ, and RMS(yQ) = RMS(y), so the original norm(y)·Q is
      (yQ / RMS(yQ))·Qᵀ·diag(1 + γ)·Q: each becomes a d×d matrix (`RotatedOutputNorm`), exact,
      at two extra d×d products per token and layer (measured in `bench.overheads`).
    - The embedding's √d scale is applied after the lookup and commutes with Q; the tied head is
      untied before the boundaries are folded in, as for every family.
    - q_norm/k_norm (per head, on q/k outputs), `query_pre_attn_scalar`, GELU-tanh and the
      per-layer sliding/global attention (its masks and position embeddings are recorded per
      layer by the engine) are inside what R1/R2 leave unchanged.
    """

    architectures = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    post_attention_norm_path = "pre_feedforward_layernorm"
    norm_offset = 1.0
    output_norm_paths = ("post_attention_layernorm", "post_feedforward_layernorm")
