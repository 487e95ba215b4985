"""Exactness of norm folding and rotation fusion, and behaviour of rotation learning."""

from __future__ import annotations

import pytest
import torch

from denoiserotator.method.adapters import get_adapter
from denoiserotator.method.rotation.fuse import (
    RotatedLayer,
    expand_kv_blocks,
    fold_layer_norms,
    fuse_layer_rotation,
    merge_boundary_rotations,
)
from denoiserotator.method.rotation.loss import InputStatistic, group_entropy, linear_entropy
from denoiserotator.method.rotation.orthogonal import orthogonal_from
from denoiserotator.method.rotation.problem import LayerProblem, layer_loss
from denoiserotator.method.rotation.train import train_rotation
from denoiserotator.settings import RotationSettings
from denoiserotator.testing import FAMILIES, tiny_model


def random_orthogonal(size: int, generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
    shape = (size, size) if batch is None else (batch, size, size)
    return orthogonal_from(torch.randn(shape, generator=generator, dtype=torch.float64))


def apply_boundary_hooks(model: torch.nn.Module, boundary: list[torch.Tensor | None]) -> None:
    """Test-local stand-in for the exported model's boundary matmuls."""
    for layer, matrix in zip(get_adapter(model).layers, boundary, strict=True):
        if matrix is None:
            continue

        def hook(_module, args, kwargs, m=matrix):
            return (args[0] @ m.to(args[0].dtype), *args[1:]), kwargs

        layer.register_forward_pre_hook(hook, with_kwargs=True)


def rotate_model_randomly(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(seed)
    rotations = []
    for index in range(adapter.num_layers):
        view = adapter.layer(index)
        rotation = random_orthogonal(adapter.hidden_size, generator).to(model.dtype)
        blocks = random_orthogonal(adapter.head_dim, generator, batch=adapter.num_kv_heads).to(model.dtype)
        fold_layer_norms(view)
        fuse_layer_rotation(view, rotation, blocks, adapter.num_heads)
        rotations.append(rotation)
    return rotations


def use_float64_rmsnorm(model: torch.nn.Module) -> None:
    """Hugging Face RMSNorm computes in float32 whatever the model dtype; for a float64 check
    of the fusion algebra, give the norms the same formula in float64."""

    offset = get_adapter(model).norm_offset  # Gemma's scale is 1 + weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        eps = getattr(self, "variance_epsilon", None) or self.eps
        return (offset + self.weight) * (hidden_states * torch.rsqrt(variance + eps))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = forward.__get__(module)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_unmerged_rotation_is_exact(family: str, dtype: torch.dtype, tolerance: float) -> None:
    model = tiny_model(family, num_layers=3).to(dtype)
    if dtype == torch.float64:
        use_float64_rmsnorm(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        rotations = rotate_model_randomly(model, seed=1)
        adapter = get_adapter(model)
        # Fusion alone must change the layer; only with the basis change is it equivalent.
        assert not torch.allclose(model(ids).logits, expected, atol=1e-3)
        for index, rotation in enumerate(rotations):
            adapter.layers[index] = RotatedLayer(adapter.layers[index], rotation)
        actual = model(ids).logits
    assert (actual - expected).abs().max().item() <= tolerance


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_merged_boundaries_are_exact(family: str, tie: bool) -> None:
    model = tiny_model(family, num_layers=3, tie=tie)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
        rotations = rotate_model_randomly(model, seed=2)
        adapter = get_adapter(model)
        boundary = merge_boundary_rotations(adapter, rotations)
        assert boundary[0] is None and all(m is not None for m in boundary[1:])
        assert not adapter.tied_embeddings
        apply_boundary_hooks(model, boundary)
        actual = model(ids).logits
    assert (actual - expected).abs().max().item() <= 1e-4


def test_head_rotation_must_follow_repeat_kv_order() -> None:
    """R2o repeats each KV block n_heads/n_kv times consecutively (repeat_kv), not cyclically."""
    blocks = torch.stack([torch.full((2, 2), float(i)) for i in range(3)])
    expanded = expand_kv_blocks(blocks, num_heads=6)
    assert [int(b[0, 0]) for b in expanded] == [0, 0, 1, 1, 2, 2]


def test_qwen2_v_bias_is_rotated() -> None:
    model = tiny_model("qwen2", num_layers=1).to(torch.float64)
    view = get_adapter(model).layer(0)
    bias_before = view.linear("v").bias.detach().clone()
    blocks = random_orthogonal(16, torch.Generator().manual_seed(0), batch=2)
    fold_layer_norms(view)
    fuse_layer_rotation(view, torch.eye(64, dtype=torch.float64), blocks, num_heads=4)
    expected = torch.block_diag(*blocks).T @ bias_before
    assert torch.allclose(view.linear("v").bias, expected)
    assert view.linear("q").bias is not None


def test_group_entropy_matches_formula() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    rows = group_entropy(scores, dim=1)
    expected = torch.log(torch.tensor(2.0)) + -(
        0.75 * torch.log(torch.tensor(0.75)) + 0.25 * torch.log(torch.tensor(0.25))
    )
    assert torch.isclose(rows, expected)
    # columns: [1,3] -> (.25,.75); [1,1] -> (.5,.5); [0,0] -> 0 (0 log 0 = 0)
    assert torch.isclose(group_entropy(scores, dim=0), expected)
    both = linear_entropy(scores.sqrt(), None, rows=True, columns=True)
    assert torch.isclose(both, 2 * expected)


def test_sparsegpt_statistic_uses_rotated_inverse_diagonal() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    gram = x.T @ x
    rotation = random_orthogonal(6, generator)
    statistic = InputStatistic.from_gram("sparsegpt", gram)
    damping = 0.01 * torch.diagonal(gram).mean()
    inverse = torch.linalg.inv(gram + damping * torch.eye(6, dtype=torch.float64))
    expected = 1.0 / torch.diagonal(rotation.T @ inverse @ rotation)
    assert torch.allclose(statistic.column_factor(rotation.float()).double(), expected, rtol=1e-4)
    wanda = InputStatistic.from_gram("wanda", gram)
    assert torch.allclose(
        wanda.column_factor(rotation.float()).double(),
        torch.diagonal(rotation.T @ gram @ rotation),
        rtol=1e-4,
    )


def _problem(score: str) -> LayerProblem:
    model = tiny_model("qwen2", num_layers=1)
    adapter = get_adapter(model)
    view = adapter.layer(0)
    fold_layer_norms(view)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=generator) * torch.linspace(0.2, 2.0, 64)
    x_o = torch.randn(400, 64, generator=generator)
    x_down = torch.randn(400, 96, generator=generator)
    grams = {"q": x.T @ x, "o": x_o.T @ x_o, "gate": x.T @ x, "down": x_down.T @ x_down}
    weights = {name: linear.weight.data for name, linear in view.linears().items()}
    return LayerProblem.from_layer(weights, grams, score, 4, 2, 16)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_training_lowers_loss_and_stays_orthogonal(score: str) -> None:
    problem = _problem(score)
    result = train_rotation(problem, RotationSettings(steps=40, lr=0.01), progress=False)
    assert result.loss_best < result.loss_start - 1e-3
    identity = torch.eye(64)
    assert (result.rotation.T @ result.rotation - identity).abs().max() <= 1e-5
    blocks = result.head_blocks
    assert (blocks.transpose(-1, -2) @ blocks - torch.eye(16)).abs().max() <= 1e-5
    # The kept iterate really has the reported loss.
    recomputed = layer_loss(problem, result.rotation, result.head_blocks, "paper")
    assert abs(float(recomputed) - result.loss_best) <= 1e-3 * abs(result.loss_best)


def test_zero_steps_keep_identity() -> None:
    result = train_rotation(_problem("wanda"), RotationSettings(steps=0), progress=False)
    assert torch.equal(result.rotation, torch.eye(64))
    assert result.loss_best == result.loss_start


def test_exact_zero_weights_do_not_poison_the_gradient() -> None:
    """Quantised checkpoints (the demo's SmolLM2) have exact zeros: the loss must stay finite."""
    problem = _problem("wanda")
    for name in ("q", "gate", "down"):
        weight = problem.weights[name]
        weight[:, ::3] = 0.0
    result = train_rotation(problem, RotationSettings(steps=10), progress=False)
    assert all(torch.isfinite(torch.tensor(result.loss_trace)))
    assert len(result.loss_trace) == 11
    assert result.loss_best < result.loss_start
