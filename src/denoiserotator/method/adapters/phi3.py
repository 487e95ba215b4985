from __future__ import annotations

from denoiserotator.method.adapters.base import ModelAdapter


class Phi3Adapter(ModelAdapter):
    """Phi-3 / Phi-3.5 / Phi-4 (dense): the LLaMA layout with fused `qkv_proj` and `gate_up_proj`.

    The fused linears are split into their row blocks in memory (`fused.SplitLinear`; q, k, v
    rows in that order, then gate and up as `gate_up_proj.chunk(2)` reads them), so the method
    sees the seven linears it knows; saved folders keep the fused layout. Partial rotary
    embeddings (`partial_rotary_factor`, Phi-4-mini: 0.75) touch only q and k inside a head,
    which neither R1 (input side of q/k) nor R2 (v's output, o's input) changes: exact.
    """

    architectures = ("Phi3ForCausalLM",)
    model_types = ("phi3",)
    linear_paths = {
        "q": "self_attn.qkv_proj.q",
        "k": "self_attn.qkv_proj.k",
        "v": "self_attn.qkv_proj.v",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_up_proj.gate",
        "up": "mlp.gate_up_proj.up",
        "down": "mlp.down_proj",
    }
    fused_linears = {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")}
