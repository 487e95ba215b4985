"""The N:M-aware concentration loss (`rotation.loss_groups: nm`): definition, gradient, wiring."""

from __future__ import annotations

import pytest
import torch

from denoiserotator.method.rotation.fused_loss import FusedLayerLoss
from denoiserotator.method.rotation.loss import _entropy_value_and_grads, linear_entropy, squared_entropy
from denoiserotator.method.rotation.problem import layer_loss
from denoiserotator.method.sequential import PruneSettings
from denoiserotator.plan.experiment import Experiment
from denoiserotator.settings import RotationSettings
from tests.method.test_rotation_optimizers import _problem, _random_rotations, _value_and_grads


def _weighted_group_entropy(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Σ_rows Σ_g (T_g / T) · H(p within g), the definition, by loops."""
    total = scores.new_zeros(())
    for row in scores:
        row_total = row.sum()
        for group in row.reshape(-1, block):
            mass = group.sum()
            if mass > 0:
                p = group / mass
                entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
                total = total + mass / row_total * entropy
    return total


def test_the_nm_loss_is_the_within_group_entropy_weighted_by_group_mass() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    factor = torch.rand(16, generator=generator, dtype=torch.float64) + 0.5
    scores = weight.square() * factor
    for block in (4, 8):
        value = linear_entropy(weight, factor, rows=True, columns=False, block=block)
        assert float(value) == pytest.approx(float(_weighted_group_entropy(scores, block)), rel=1e-12)
    # one important weight per group of 4: no N:M-aware loss left, while the paper's loss is not zero
    concentrated = torch.zeros(3, 16, dtype=torch.float64)
    concentrated[:, ::4] = torch.rand(3, 4, generator=generator, dtype=torch.float64) + 1
    assert float(linear_entropy(concentrated, None, rows=True, columns=False, block=4)) == pytest.approx(
        0, abs=1e-12
    )
    assert float(linear_entropy(concentrated, None, rows=True, columns=False)) > 1.0


@pytest.mark.parametrize(("rows", "columns"), [(True, False), (True, True)])
@pytest.mark.parametrize("block", [4, 8])
def test_the_nm_loss_gradient_matches_autograd_in_float64(rows: bool, columns: bool, block: int) -> None:
    """The hand-written gradient (`_entropy_value_and_grads`, what training uses) against
    autograd of the definition (`linear_entropy`), w.r.t. the weight and the column factor,
    with an all-zero row and an all-zero group."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 24, generator=generator, dtype=torch.float64)
    weight[2] = 0.0
    weight[4, 8:12] = 0.0
    factor = torch.rand(24, generator=generator, dtype=torch.float64) + 0.5
    value, grad_weight, grad_factor = _entropy_value_and_grads(weight, factor, rows, columns, True, block)
    leaf, leaf_factor = weight.clone().requires_grad_(True), factor.clone().requires_grad_(True)
    reference = linear_entropy(leaf, leaf_factor, rows=rows, columns=columns, block=block)
    expected_weight, expected_factor = torch.autograd.grad(reference, [leaf, leaf_factor])
    assert float(value) == pytest.approx(float(reference.detach()), rel=1e-12)
    torch.testing.assert_close(grad_weight, expected_weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_factor, expected_factor, rtol=1e-10, atol=1e-12)
    # and through the autograd Function the optimizers call
    leaf2 = weight.clone().requires_grad_(True)
    (through,) = torch.autograd.grad(squared_entropy(leaf2, factor, rows, columns, block), [leaf2])
    torch.testing.assert_close(through, expected_weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_the_fused_nm_loss_equals_the_layer_loss_and_differs_from_the_papers(score: str) -> None:
    problem = _problem(score)
    problem.row_block = 4
    rotation, blocks = _random_rotations(problem, 0)
    paper_value, paper_grads = _value_and_grads(
        lambda r, b: layer_loss(problem, r, b, "paper"), rotation, blocks
    )
    fused_value, fused_grads = _value_and_grads(FusedLayerLoss(problem, torch.float64), rotation, blocks)
    assert fused_value == pytest.approx(paper_value, rel=1e-9)
    for expected, actual in zip(paper_grads, fused_grads, strict=True):
        assert float((actual - expected).norm() / expected.norm()) <= 1e-9
    problem.row_block = 0
    assert float(layer_loss(problem, rotation, blocks, "paper")) > paper_value  # the groups' part is gone


def test_the_nm_loss_acts_on_nm_rows_only_and_renames_nothing_else() -> None:
    rotation = RotationSettings(loss_groups="nm")
    assert PruneSettings(pruner="wanda", pattern="2:4", rotation=rotation).loss_row_block == 4
    assert PruneSettings(pruner="wanda", pattern="4:8", rotation=rotation).loss_row_block == 8
    assert PruneSettings(pruner="wanda", pattern="50%", rotation=rotation).loss_row_block == 0
    assert PruneSettings(pruner="wanda", pattern="2:4", rotation=RotationSettings()).loss_row_block == 0
    base = {
        "models": [{"slug": "m", "source": "tiny:llama"}],
        "pruners": ["wanda"],
        "patterns": ["50%", "2:4"],
    }
    paper = {r.path: r for r in Experiment(base).rows()}
    nm = Experiment({**base, "rotation": {"loss_groups": "nm"}})
    changed = {r.path for r in nm.rows()} - set(paper)
    # only the rotated 2:4 row is renamed: the unstructured and plain rows keep their paths and params
    assert [p for p in changed if "2-4_dr-" in p] == list(changed) and len(changed) == 1
    for row in nm.rows():
        if row.path in paper and row.pruner == "wanda" and row.rotation == "denoise":
            assert "loss_groups" not in nm.prune_params(row.model, row.calib, row.variant)["rotation"]
    row = next(r for r in nm.rows() if r.path in changed)
    assert nm.prune_params(row.model, row.calib, row.variant)["rotation"]["loss_groups"] == "nm"


def test_the_compiled_kernel_computes_the_nm_loss_too() -> None:
    """A large CPU matrix goes through torch.compile (`COMPILE_MIN_ELEMENTS`) with the block."""
    from denoiserotator.method.rotation import loss as entropy

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, entropy.COMPILE_MIN_ELEMENTS // 1024, generator=generator)
    compiled = entropy._value_and_grads(weight, None, True, False, True, 4)
    eager = entropy._entropy_value_and_grads(weight, None, True, False, True, 4)
    assert not entropy._compiled.get("failed")
    assert float(compiled[0]) == pytest.approx(float(eager[0]), rel=1e-6)
    assert torch.allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-6 * float(eager[1].abs().max()))
