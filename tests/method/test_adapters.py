"""One contract, checked for every adapter on a tiny random model of its family.

Adding a family = one adapter file + its entry in FAMILIES (denoiserotator.testing).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from denoiserotator.method.adapters import (
    ADAPTERS,
    LINEAR_NAMES,
    UnsupportedArchitectureError,
    adapter_class_for_config,
    get_adapter,
)
from denoiserotator.testing import FAMILIES, tiny_config, tiny_model


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_every_adapter_has_a_family_under_test() -> None:
    covered = {adapter_class_for_config(tiny_config(family)) for family in FAMILIES}
    assert covered == set(ADAPTERS)


def test_linear_shapes_match_the_reported_facts(family: str) -> None:
    adapter = get_adapter(tiny_model(family))
    d, hd = adapter.hidden_size, adapter.head_dim
    expected = {
        "q": (adapter.num_heads * hd, d),
        "k": (adapter.num_kv_heads * hd, d),
        "v": (adapter.num_kv_heads * hd, d),
        "o": (d, adapter.num_heads * hd),
        "gate": (adapter.intermediate_size, d),
        "up": (adapter.intermediate_size, d),
        "down": (d, adapter.intermediate_size),
    }
    for index in range(adapter.num_layers):
        view = adapter.layer(index)
        assert set(view.linears()) == set(LINEAR_NAMES)
        for name, shape in expected.items():
            assert tuple(view.linear(name).weight.shape) == shape, (family, name)
        assert view.input_norm.weight.shape == (d,)
        assert view.post_attention_norm.weight.shape == (d,)
    assert adapter.num_heads % adapter.num_kv_heads == 0
    assert adapter.embedding.weight.shape == (adapter.config.vocab_size, d)
    assert adapter.lm_head.weight.shape == (adapter.config.vocab_size, d)
    assert adapter.final_norm.weight.shape == (d,)


def test_the_adapter_sees_the_modules_the_model_runs(family: str) -> None:
    """Zeroing what the adapter calls q of layer 0 must change the model's output."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(ids).logits
        for name in LINEAR_NAMES:
            adapter.layer(0).linear(name).weight.zero_()
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_biases_are_reported(family: str) -> None:
    adapter = get_adapter(tiny_model(family))
    assert adapter.linear_has_bias("v") == (family == "qwen2")
    assert not adapter.linear_has_bias("o") and not adapter.linear_has_bias("down")


def test_tied_embeddings_are_detected(family: str) -> None:
    assert get_adapter(tiny_model(family, tie=True)).tied_embeddings
    assert not get_adapter(tiny_model(family, tie=False)).tied_embeddings


def test_dispatch_uses_the_config_not_the_name(family: str) -> None:
    config = tiny_config(family)
    config.name_or_path = "some/renamed-local-checkpoint"
    config.architectures = None  # only model_type left
    assert adapter_class_for_config(config) is adapter_class_for_config(tiny_config(family))


def test_unsupported_architecture_fails_naming_it() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    model.config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        get_adapter(model)
