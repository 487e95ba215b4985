"""The accessor contract between model families and the method.

Rotation, pruning and the engine only talk to this vocabulary; they never touch
family-specific module names (SliceGPT's lesson). An adapter is chosen from the
model config (`architectures` / `model_type`), never from a hub name or path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# The linears that share one input, in the true-sequential order of SPEC §5. Pruning takes the
# groups in this order, re-collecting the Gram matrices on the partly pruned layer before each;
# the rotation loss takes one input statistic per group (SPEC §3).
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attention_in": ("q", "k", "v"),
    "attention_out": ("o",),
    "mlp_in": ("gate", "up"),
    "mlp_out": ("down",),
}
LINEAR_NAMES: tuple[str, ...] = tuple(name for group in INPUT_GROUPS.values() for name in group)


def linear_rows(config: object) -> dict[str, int]:
    """Output rows of each of the seven linears, from a transformers config (or a namespace of one)."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(config.intermediate_size)
    return {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim, "o": hidden,
            "gate": intermediate, "up": intermediate, "down": hidden}  # fmt: skip


@dataclass(frozen=True)
class LayerAdapter:
    """Named access to one decoder layer of a pre-norm attention + SwiGLU block."""

    layer: nn.Module
    linear_paths: dict[str, str]
    input_norm_path: str
    post_attention_norm_path: str
    norm_offset: float = 0.0
    output_norm_paths: tuple[str, ...] = ()

    def linear(self, name: str) -> nn.Linear:
        return self.layer.get_submodule(self.linear_paths[name])

    def linears(self) -> dict[str, nn.Linear]:
        return {name: self.linear(name) for name in LINEAR_NAMES}

    @property
    def input_norm(self) -> nn.Module:
        return self.layer.get_submodule(self.input_norm_path)

    @property
    def post_attention_norm(self) -> nn.Module:
        return self.layer.get_submodule(self.post_attention_norm_path)

    def replace(self, path: str, module: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(self.layer.get_submodule(parent) if parent else self.layer, child, module)


class ModelAdapter:
    """Named access to a causal LM of one family. Subclasses set the class attributes."""

    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    linear_paths: ClassVar[dict[str, str]] = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    input_groups: ClassVar[dict[str, tuple[str, ...]]] = INPUT_GROUPS
    # Stored fused linears (path in a layer → the linears whose rows it stacks, in order). They
    # are split in memory when the adapter is made (`fused.SplitLinear`) and saved fused.
    fused_linears: ClassVar[dict[str, tuple[str, ...]]] = {}
    input_norm_path: ClassVar[str] = "input_layernorm"
    # The norm in front of the MLP (LLaMA's name; Gemma's pre_feedforward_layernorm).
    post_attention_norm_path: ClassVar[str] = "post_attention_layernorm"
    # RMSNorm scale convention: x̂·(norm_offset + weight) (Gemma: 1 + weight).
    norm_offset: ClassVar[float] = 0.0
    # Norms on a sublayer's output before the residual add (Gemma's sandwich norms); a rotation
    # turns their scale into a d×d matrix (`rotation.fuse.fuse_layer_rotation`).
    output_norm_paths: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"
    embedding_path: ClassVar[str] = "model.embed_tokens"
    final_norm_path: ClassVar[str] = "model.norm"
    lm_head_path: ClassVar[str] = "lm_head"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        if self.fused_linears:
            self._split_fused_linears()

    def _split_fused_linears(self) -> None:
        from denoiserotator.method.adapters.fused import SplitLinear

        rows = linear_rows(self.config)
        for layer in self.layers:
            for path, names in self.fused_linears.items():
                module = layer.get_submodule(path)
                if not isinstance(module, SplitLinear):
                    parent, _, child = path.rpartition(".")
                    split = SplitLinear(module, {name: rows[name] for name in names})
                    setattr(layer.get_submodule(parent) if parent else layer, child, split)

    def prepare_rotated_structure(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Give layer `index` the modules a rotated layer's `state` (its state_dict) has: the
        sublayer-output norms whose scale became a d×d matrix (`RotatedOutputNorm`, Gemma 3), so a
        checkpointed layer loads into a freshly loaded model."""
        from denoiserotator.files.modeling_denoiserotator import RotatedOutputNorm

        layer = self.layer(index)
        for path in self.output_norm_paths:
            norm = layer.layer.get_submodule(path)
            saved = state.get(f"{path}.weight")
            if saved is not None and saved.ndim == 2 and not isinstance(norm, RotatedOutputNorm):
                size, device = norm.weight.numel(), norm.weight.device
                layer.replace(path, RotatedOutputNorm(size, float(norm.eps), saved.dtype, device))

    @classmethod
    def stored_linears(cls) -> dict[str, tuple[str, ...]]:
        """Each linear as stored in a saved folder (path in a layer → the linears it holds)."""
        fused_parts = {name for names in cls.fused_linears.values() for name in names}
        stored = {path: names for path, names in cls.fused_linears.items()}
        stored.update({cls.linear_paths[name]: (name,) for name in LINEAR_NAMES if name not in fused_parts})
        return stored

    @classmethod
    def lora_target_modules(cls, targets: tuple[str, ...]) -> list[str]:
        """peft `target_modules` for this family from names of the stock layout's linears
        (`q_proj`, ... as in LLaMA, or this family's own, e.g. `qkv_proj`): a fused linear is
        reached through its split blocks, so LoRA trains (and merges into) the same weights
        the masks cover."""
        stock = {path.rsplit(".", 1)[-1]: name for name, path in ModelAdapter.linear_paths.items()}
        fused = {path.rsplit(".", 1)[-1]: names for path, names in cls.fused_linears.items()}
        modules: list[str] = []
        for target in targets:
            if target in fused:
                names = fused[target]
            elif target in stock and cls.linear_paths[stock[target]] != ModelAdapter.linear_paths[stock[target]]:  # noqa: E501
                names = (stock[target],)
            else:
                modules.append(target)
                continue
            modules += [".".join(cls.linear_paths[name].split(".")[-2:]) for name in names]
        return modules

    # --- structure -----------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> LayerAdapter:
        return self.wrap_layer(self.layers[index])

    def wrap_layer(self, layer: nn.Module) -> LayerAdapter:
        return LayerAdapter(
            layer,
            dict(self.linear_paths),
            self.input_norm_path,
            self.post_attention_norm_path,
            self.norm_offset,
            self.output_norm_paths,
        )

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.get_submodule(self.embedding_path)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.final_norm_path)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_submodule(self.lm_head_path)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from the last decoder layer's output: final norm, lm_head, and the
        soft-capping tanh(z / c)·c of families that set `final_logit_softcapping` (Gemma)."""
        logits = self.lm_head(self.final_norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.embedding.weight

    # --- facts ---------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return int(head_dim or self.hidden_size // self.num_heads)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    def linear_has_bias(self, name: str) -> bool:
        return self.layer(0).linear(name).bias is not None
