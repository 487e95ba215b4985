"""Block-diagonal R1 (`rotation.r1_blocks`): orthogonal, block-diagonal, function-preserving, and
applied block by block in the exported model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from denoiserotator.files.export import load_model, save_model
from denoiserotator.files.modeling_denoiserotator import BLOCKS_KEY, BoundaryRotation, block_count
from denoiserotator.method.rotation.orthogonal import block_diagonal_mask
from denoiserotator.method.rotation.train import train_rotation
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.settings import RotationSettings
from denoiserotator.testing import tiny_model, tiny_tokenizer
from tests.method.test_rotation_optimizers import _problem
from tests.method.test_sequential import calibration


@pytest.mark.parametrize("optimizer", ["cayley", "paper", "lbfgs"])
@pytest.mark.parametrize("blocks", [2, 4])
def test_every_optimizer_learns_an_orthogonal_block_diagonal_r1(optimizer: str, blocks: int) -> None:
    problem = _problem("wanda")
    settings = RotationSettings(steps=12, optimizer=optimizer, r1_blocks=blocks, tol=0)
    result = train_rotation(problem, settings, progress=False)
    r1 = result.rotation
    size = r1.shape[0]
    outside = block_diagonal_mask(size, blocks) == 0
    assert not bool(r1[outside].any()), "R1 left its diagonal blocks"
    assert float((r1.T @ r1 - torch.eye(size, dtype=r1.dtype)).norm()) <= 1e-10
    assert not torch.allclose(r1, torch.eye(size, dtype=r1.dtype))  # it learned something
    assert block_count(r1) == blocks if blocks > 1 else True
    assert result.loss_best < result.loss_start


def test_block_diagonal_r1_refuses_a_hidden_size_it_does_not_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        train_rotation(_problem("wanda"), RotationSettings(steps=2, r1_blocks=7), progress=False)


def test_the_rotation_only_row_with_blocks_keeps_the_function_and_exports_blocks(tmp_path: Path) -> None:
    model = tiny_model("llama", num_layers=2)
    ids = calibration(model)
    with torch.no_grad():
        expected = model(ids).logits
    settings = PruneSettings(pruner="none", pattern=None, rotation=RotationSettings(steps=10, r1_blocks=4))
    result = run_pipeline(model, ids, settings, progress=False)
    assert all(block_count(q) == 4 for q in result.rotations if q is not None)
    save_model(result.model, tiny_tokenizer(), tmp_path / "m", boundary=result.boundary)
    loaded, _ = load_model(tmp_path / "m")
    assert getattr(loaded.config, BLOCKS_KEY) == 4
    rotations = [m for m in loaded.modules() if isinstance(m, BoundaryRotation)]
    assert rotations and all(m.blocks == 4 for m in rotations)
    with torch.no_grad():
        actual = loaded(ids).logits
    assert (actual - expected).abs().max().item() <= 1e-4


def test_a_block_boundary_is_applied_as_the_dense_product() -> None:
    generator = torch.Generator().manual_seed(0)
    dense = torch.block_diag(*[torch.linalg.qr(torch.randn(8, 8, generator=generator))[0] for _ in range(4)])
    rotation = BoundaryRotation(32)
    with torch.no_grad():
        rotation.weight.copy_(dense)
    rotation.blocks = block_count(dense)
    assert rotation.blocks == 4
    states = torch.randn(2, 5, 32, generator=generator)
    torch.testing.assert_close(rotation(states), states @ dense)
    dense[0, 31] = 1e-3  # one entry outside the blocks: not block-diagonal any more
    assert block_count(dense) == 1
    assert block_count(torch.eye(32)) == 32 and block_count(torch.eye(32), limit=6) == 4
    two = torch.block_diag(torch.ones(16, 16), torch.zeros(16, 16))  # all-zero rows fit any block
    assert block_count(two) == 2


def test_a_block_count_that_does_not_divide_the_hidden_size_is_refused_before_any_work() -> None:
    from denoiserotator.method.checks import SettingError

    model = tiny_model("llama", num_layers=1)
    settings = PruneSettings(pruner="wanda", pattern="50%", rotation=RotationSettings(steps=1, r1_blocks=7))
    with pytest.raises(SettingError, match="r1_blocks = 7.*allowed: 1, 2, 4"):
        run_pipeline(model, calibration(model), settings, progress=False)
