"""Tiny random models of every supported family, for tests and the tiny workflow config.

They are built from configs in code (no hub access) and use a small BPE tokenizer
trained on a fixed English paragraph, so a saved folder is a complete HF model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from denoiserotator.method.adapters import FAMILIES, adapter_class_for_config

__all__ = ["FAMILIES", "tiny_config", "tiny_model", "tiny_tokenizer", "save_tiny_model"]

_TOKENIZER_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair. "
    "The Congress shall have power to lay and collect taxes, duties, imposts and excises, to pay the debts "
    "and provide for the common defence and general welfare of the United States. Call me Ishmael. "
    "Some years ago, never mind how long precisely, having little or no money in my purse, and nothing "
    "particular to interest me on shore, I thought I would sail about a little and see the watery part "
    "of the world. 0 1 2 3 4 5 6 7 8 9 ? ! ; : ' \" ( ) - ."
)


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_config(
    family: str, vocab_size: int = 384, num_layers: int = 2, tie: bool = False, **overrides: object
) -> PretrainedConfig:
    """`overrides` replace any config argument (e.g. num_key_value_heads=1 for MQA)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family == "mistral":
        # A short window so the sliding-window mask actually differs from a causal one.
        common["sliding_window"] = 8
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    if family == "qwen2":
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    if family == "mistral":
        return MistralConfig(architectures=["MistralForCausalLM"], **common)
    if family == "qwen3":
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common)
    if family == "gemma3_text":
        # Alternating sliding/global layers with a short window, so both masks and both rotary
        # embeddings are exercised; a query scale other than head_dim, as in the 27B model.
        common.setdefault("layer_types", ["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(int(common["num_hidden_layers"]))])  # fmt: skip
        common.setdefault("sliding_window", 8)
        common.setdefault("query_pre_attn_scalar", 24)
        return Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], **common)
    if family == "phi3":
        # Partial rotary as in Phi-4-mini (0.75 there), so the pass-through half of a head is exercised.
        rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
        common.setdefault("rope_parameters", rope)
        return Phi3Config(architectures=["Phi3ForCausalLM"], **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def tiny_model(
    family: str, seed: int = 0, num_layers: int = 2, tie: bool = False, **overrides: object
) -> PreTrainedModel:
    """A random model whose norms and biases are non-trivial, so folding bugs show."""
    torch.manual_seed(seed)
    config = tiny_config(family, num_layers=num_layers, tie=tie, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    # norm scales ~ 1 + 0.3·N(0, 1) in every family (Gemma stores scale - 1)
    offset = adapter_class_for_config(config).norm_offset
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 - offset + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
    return model


def save_tiny_model(family: str, out_dir: Path, seed: int = 0, num_layers: int = 2) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed=seed, num_layers=num_layers).save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


def sized_llama(hidden: int, intermediate: int, heads: int, layers: int, vocab: int) -> PreTrainedModel:
    """A random Llama of the given widths (kv heads: half the heads), SDPA attention, seed 0."""
    config = tiny_config("llama", num_layers=layers, vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, head_dim=hidden // heads)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def lora_saved_bytes(model: PreTrainedModel, input_ids: torch.Tensor, checkpointing: bool) -> int:
    """Bytes of the tensors autograd saves for backward in one LoRA forward of `input_ids` through
    `model` (peft adapters on all seven linears, dropout, training mode), parameters excluded:
    the measurement behind `flops.lora_activation_bytes`."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if checkpointing:
        base = peft_model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    parameters = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        peft_model(input_ids=input_ids, labels=input_ids, use_cache=False)
    return sum(saved.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random model folder (for tests and CI).")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    save_tiny_model(args.family, args.out, seed=args.seed, num_layers=args.layers)


if __name__ == "__main__":
    main()
