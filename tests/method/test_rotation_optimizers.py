"""The fast rotation path: same loss as the paper recipe, the Cayley optimiser, bookkeeping."""

from __future__ import annotations

import pytest
import torch

from denoiserotator.method.adapters import get_adapter
from denoiserotator.method.pruners.sparsegpt import inverse_hessian_cholesky
from denoiserotator.method.rotation.fuse import fold_layer_norms
from denoiserotator.method.rotation.fused_loss import FusedLayerLoss
from denoiserotator.method.rotation.iterate import RotationResult
from denoiserotator.method.rotation.loss import InputStatistic, linear_entropy, squared_entropy
from denoiserotator.method.rotation.orthogonal import cayley_retract, orthogonal_from
from denoiserotator.method.rotation.problem import LayerProblem, layer_loss
from denoiserotator.method.rotation.train import train_rotation
from denoiserotator.settings import RotationSettings
from denoiserotator.testing import tiny_model


def _problem(score: str, family: str = "qwen2", seed: int = 0) -> LayerProblem:
    model = tiny_model(family, num_layers=1)
    adapter = get_adapter(model)
    view = adapter.layer(0)
    fold_layer_norms(view)
    generator = torch.Generator().manual_seed(seed)
    hidden, attn_width = adapter.hidden_size, adapter.num_heads * adapter.head_dim
    mlp = view.linear("down").in_features
    x = torch.randn(400, hidden, generator=generator) * torch.linspace(0.2, 2.0, hidden)
    x_o = torch.randn(400, attn_width, generator=generator)
    x_down = torch.randn(400, mlp, generator=generator)
    grams = {"q": x.T @ x, "o": x_o.T @ x_o, "gate": x.T @ x, "down": x_down.T @ x_down}
    weights = {name: linear.weight.data for name, linear in view.linears().items()}
    return LayerProblem.from_layer(
        weights, grams, score, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    )


def _random_rotations(problem: LayerProblem, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = problem.weights["q"].shape[1]
    shape = (problem.num_kv_heads, problem.head_dim, problem.head_dim)
    rotation = orthogonal_from(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64))
    blocks = orthogonal_from(torch.randn(shape, generator=generator, dtype=torch.float64))
    return rotation, blocks


def _value_and_grads(fn, rotation: torch.Tensor, blocks: torch.Tensor):
    rotation = rotation.clone().requires_grad_(True)
    blocks = blocks.clone().requires_grad_(True)
    loss = fn(rotation, blocks)
    grads = torch.autograd.grad(loss, [rotation, blocks])
    return float(loss.detach()), grads


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_fused_loss_equals_paper_loss_and_gradient(score: str, family: str) -> None:
    """Same objective: value and gradient w.r.t. the same rotations agree to 1e-5 in fp64."""
    problem = _problem(score, family)
    fused = FusedLayerLoss(problem, torch.float64)
    for seed in (0, 1):
        rotation, blocks = _random_rotations(problem, seed)
        paper_value, paper_grads = _value_and_grads(
            lambda r, b: layer_loss(problem, r, b, "paper"), rotation, blocks
        )
        fused_value, fused_grads = _value_and_grads(fused, rotation, blocks)
        assert fused_value == pytest.approx(paper_value, rel=1e-5)
        for expected, actual in zip(paper_grads, fused_grads, strict=True):
            assert float((actual - expected).norm() / expected.norm()) <= 1e-5
    # fp32, as trained: still the same number to float precision
    rotation, blocks = _random_rotations(problem, 2)
    paper32 = float(layer_loss(problem, rotation.float(), blocks.float(), "paper"))
    fused32 = float(FusedLayerLoss(problem)(rotation.float(), blocks.float()))
    assert fused32 == pytest.approx(paper32, rel=1e-5)


def test_squared_entropy_matches_linear_entropy_with_zeros() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    weight[2] = 0.0  # an all-zero row group
    weight[:, 3] = 0.0  # an all-zero column group
    weight[0, 0] = 0.0
    factor = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
    for rows, columns in ((True, False), (False, True), (True, True)):
        results = []
        for fn in (linear_entropy, squared_entropy):
            w = weight.clone().requires_grad_(True)
            f = factor.clone().requires_grad_(True)
            loss = fn(w, f, rows=rows, columns=columns)
            results.append((loss.detach(), *torch.autograd.grad(loss, [w, f])))
        for expected, actual in zip(*results, strict=True):
            assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12)


def _cayley_by_definition(skew: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype).expand_as(skew)
    return torch.linalg.inv(eye - skew / 2) @ (eye + skew / 2)


def test_cayley_retract_is_the_product_with_the_cayley_factor_and_orthogonal() -> None:
    generator = torch.Generator().manual_seed(0)
    rotation = orthogonal_from(torch.randn(3, 8, 8, generator=generator, dtype=torch.float64))
    matrix = torch.randn(3, 8, 8, generator=generator, dtype=torch.float64)
    skew = matrix - matrix.transpose(-1, -2)
    stepped = cayley_retract(rotation, skew)
    assert torch.allclose(stepped, rotation @ _cayley_by_definition(skew), atol=1e-12)
    eye = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    assert torch.allclose(stepped.transpose(-1, -2) @ stepped, eye)


def test_default_optimizer_is_cayley() -> None:
    assert RotationSettings().optimizer == "cayley"


@pytest.mark.parametrize("optimizer", ["cayley", "lbfgs"])
@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_fast_optimizers_lower_loss_keep_best_and_are_deterministic(score: str, optimizer: str) -> None:
    problem = _problem(score)
    settings = RotationSettings(steps=40, optimizer=optimizer)
    result = train_rotation(problem, settings, progress=False)
    assert result.loss_best < result.loss_start - 1e-3
    assert result.loss_best == min(result.loss_trace)
    assert result.loss_trace[0] == result.loss_start
    assert (result.rotation.T @ result.rotation - torch.eye(64)).abs().max() <= 1e-5
    blocks = result.head_blocks
    assert (blocks.transpose(-1, -2) @ blocks - torch.eye(16)).abs().max() <= 1e-5
    recomputed = layer_loss(problem, result.rotation, result.head_blocks, "paper")
    assert abs(float(recomputed) - result.loss_best) <= 1e-4 * abs(result.loss_best)
    again = train_rotation(problem, settings, progress=False)
    assert again.loss_trace == result.loss_trace
    assert torch.equal(again.rotation, result.rotation)


@pytest.mark.parametrize("optimizer", ["cayley", "lbfgs"])
def test_fast_optimizers_match_the_paper_recipe_at_equal_steps(optimizer: str) -> None:
    """On this 64-wide toy layer, 100 steps of either fast optimizer end no higher than the paper
    recipe's 100 (within 0.05%; the cayley defaults' momentum, tuned on SmolLM2's layers, starts
    slower here). Their speed on real layers is bench/rotation_speed.py's to measure."""
    problem = _problem("wanda")
    paper = train_rotation(problem, RotationSettings(steps=100, optimizer="paper"), progress=False)
    fast = train_rotation(problem, RotationSettings(steps=100, tol=0, optimizer=optimizer), progress=False)
    assert fast.loss_best <= paper.loss_best * (1 + 5e-4)


def test_steps_reports_the_steps_actually_run() -> None:
    problem = _problem("wanda")
    # Any improvement below 100% over one step is a plateau: stops after one step.
    for optimizer in ("cayley", "lbfgs"):
        settings = RotationSettings(steps=50, patience=1, tol=1.0, optimizer=optimizer)
        result = train_rotation(problem, settings, progress=False)
        assert result.stop_reason == "plateau"
        assert result.steps == 1
        summary = result.summary()
        assert summary["rotation_steps"] == 1
        assert summary["rotation_optimizer"] == optimizer
    # A callback can stop either optimiser; the count follows.
    for optimizer in ("cayley", "lbfgs", "paper"):
        stopped = train_rotation(
            problem,
            RotationSettings(steps=50, optimizer=optimizer),
            progress=False,
            callback=lambda step, *_: step >= 3,
        )
        assert stopped.steps == 3 and stopped.stop_reason == "callback"
        assert stopped.summary()["rotation_steps"] == 3
        assert stopped.summary()["rotation_optimizer"] == optimizer
    full = train_rotation(problem, RotationSettings(steps=5, optimizer="paper"), progress=False)
    assert full.summary()["rotation_steps"] == 5 and len(full.loss_trace) == 6


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        RotationSettings(optimizer="sgd")


def test_log_line_is_readable() -> None:
    result = RotationResult(
        rotation=torch.eye(2),
        head_blocks=torch.eye(2)[None],
        loss_start=812.3,
        loss_best=640.1,
        best_step=130,
        steps=137,
        seconds=4.2,
        optimizer="cayley",
        stop_reason="plateau",
    )
    line = result.log_line()
    assert line == (
        "loss 812.3 → 640.1 (-21.2%), 137 steps (best at 130), stopped: plateau, optimizer cayley, 4.2 s"
    )


def _indefinite_gram(size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    basis = orthogonal_from(torch.randn(size, size, generator=generator, dtype=torch.float64))
    eigen = torch.ones(size, dtype=torch.float64)
    eigen[0] = -0.05  # 1% damping leaves it indefinite, 10% does not
    return basis @ torch.diag(eigen) @ basis.T


def test_sparsegpt_statistic_survives_an_indefinite_gram_with_the_pruners_damping() -> None:
    gram = _indefinite_gram()
    mean = float(torch.diagonal(gram).mean())
    with pytest.raises(torch.linalg.LinAlgError):  # what the statistic used to do
        torch.linalg.cholesky(gram + 0.01 * mean * torch.eye(16, dtype=torch.float64))
    statistic = InputStatistic.from_gram("sparsegpt", gram)
    _, _, pruner_damping = inverse_hessian_cholesky(gram, 0.01)
    assert statistic.damping == pruner_damping == pytest.approx(0.1)
    assert statistic.shift == pytest.approx(0.1 * mean)
    generator = torch.Generator().manual_seed(1)
    rotation = orthogonal_from(torch.randn(16, 16, generator=generator, dtype=torch.float64))
    inverse = torch.linalg.inv(gram + 0.1 * mean * torch.eye(16, dtype=torch.float64))
    expected = 1.0 / torch.diagonal(rotation.T @ inverse @ rotation)
    assert torch.allclose(statistic.column_factor(rotation.float()).double(), expected, rtol=1e-4)


def test_rotation_damping_is_reported() -> None:
    problem = _problem("sparsegpt")
    hidden = problem.weights["q"].shape[1]
    gram = _indefinite_gram(hidden) * 100
    problem.inputs["attn"] = InputStatistic.from_gram("sparsegpt", gram)
    result = train_rotation(problem, RotationSettings(steps=2), progress=False)
    assert result.summary()["rotation_damping"] == pytest.approx(0.1)
    assert "damping 0.1" in result.log_line()
    wanda = train_rotation(_problem("wanda"), RotationSettings(steps=2), progress=False)
    assert wanda.summary()["rotation_damping"] == 0.0
    # the prune job's per-layer log line (SLURM log, report) says it too, and how training ended
    from denoiserotator.logs import layer_summary

    line = layer_summary({"layer": 4, **result.summary(), "rotation_stop": "plateau", "seconds": 2.0}, 32)
    assert line.startswith("layer 5/32: loss ") and line.endswith(", stopped: plateau, damping 0.1, 2.0 s")
    assert "damping" not in layer_summary({"layer": 0, **wanda.summary()}, 32)


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_non_finite_gram_is_refused(score: str) -> None:
    gram = torch.eye(4, dtype=torch.float64)
    gram[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        InputStatistic.from_gram(score, gram)


def test_a_jump_in_the_loss_backs_off_at_once() -> None:
    """A step far too large raises the loss; `rise_limit` returns to the best iterate with half
    the step at the next evaluation, so training still makes progress (without it, and with the
    slow back-off disabled, it never does)."""
    problem = _problem("wanda")
    too_large = {"steps": 30, "tol": 0, "tangent_lr": 2.0, "backoff": 0}
    recovering = train_rotation(problem, RotationSettings(**too_large, rise_limit=0.01), progress=False)
    stuck = train_rotation(problem, RotationSettings(**too_large, rise_limit=1e9), progress=False)
    assert stuck.loss_best == stuck.loss_start
    assert recovering.loss_best < recovering.loss_start - 1e-3


def test_tf32_is_scoped_to_the_loss_on_cuda_and_never_used_on_cpu() -> None:
    """The loss's matmul precision is set only on a CUDA device, only inside the block, and the
    global setting is restored even when the block raises."""
    from denoiserotator.method.rotation.fused_loss import loss_matmul_precision

    before = torch.get_float32_matmul_precision()
    with loss_matmul_precision("high", torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    with pytest.raises(RuntimeError):
        with loss_matmul_precision("high", torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "high"
            raise RuntimeError("a failing step")
    assert torch.get_float32_matmul_precision() == before


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to nearest at TF32's 10 explicit mantissa bits (what tensor cores read)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).to(x.dtype)


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_tf32_operands_keep_the_loss_within_1e_3(score: str) -> None:
    """The CPU stand-in for the GPU claim behind `rotation.matmul_precision: high`: with every
    matmul operand (weights, statistics, rotations) rounded to TF32, the loss moves by less than
    1e-4 relative, a tenth of the 1e-3 allowed (bench/gpu_check.py measures the real kernels)."""
    from dataclasses import replace

    problem = _problem(score)
    rounded = replace(
        problem,
        weights={name: _tf32(w) for name, w in problem.weights.items()},
        inputs={
            key: replace(stat, matrix=None if stat.matrix is None else _tf32(stat.matrix))
            for key, stat in problem.inputs.items()
        },
    )
    for seed in (0, 1):
        rotation, blocks = _random_rotations(problem, seed)
        exact = float(FusedLayerLoss(problem, torch.float64)(rotation, blocks))
        tf32_rotations = _tf32(rotation).double(), _tf32(blocks).double()
        approximate = float(FusedLayerLoss(rounded, torch.float64)(*tf32_rotations))
        assert abs(approximate - exact) <= 1e-4 * abs(exact)
        assert approximate != exact  # the rounding is real


def _record_cayley_moves(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[int], list[int]]:
    """Patches the Cayley optimiser to record the R1 move of every step (its Frobenius norm), and,
    for every back-off, the index of the first move after it and the step it happened at."""
    from denoiserotator.method.rotation import cayley

    moves: list[float] = []
    first_after_backoff: list[int] = []
    backoff_steps: list[int] = []
    real_retract, real_restore = cayley.cayley_retract, cayley._TangentAdam.restore

    def retract(rotation: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
        if skew.dim() == 2:  # R1 (R2's blocks are batched)
            moves.append(float(torch.linalg.vector_norm(skew)))
        return real_retract(rotation, skew)

    def restore(self, saved) -> None:  # type: ignore[no-untyped-def]
        first_after_backoff.append(len(moves))
        backoff_steps.append(len(moves))  # steps 0..k-1 made k moves: this is step k
        real_restore(self, saved)

    monkeypatch.setattr(cayley, "cayley_retract", retract)
    monkeypatch.setattr(cayley._TangentAdam, "restore", restore)
    return moves, first_after_backoff, backoff_steps


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_a_back_off_at_least_halves_the_move(score: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a back-off the first move is at most half the last move before it (zeroing Adam's
    moments instead made it a sign step, several times larger)."""
    moves, first_after_backoff, _ = _record_cayley_moves(monkeypatch)
    settings = RotationSettings(steps=80, tol=0, tangent_lr=1.0, rise_limit=1e-3)
    train_rotation(_problem(score), settings, progress=False)
    assert len(first_after_backoff) >= 3  # the settings force back-offs
    for index in first_after_backoff:
        assert moves[index] <= 0.5 * moves[index - 1] * (1 + 1e-6)


def test_a_plateau_is_measured_at_a_constant_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plateau rule looks at `patience` steps none of which followed a back-off: a step just
    shrunk by a back-off improves the loss little, which is not a plateau."""
    _, _, backoff_steps = _record_cayley_moves(monkeypatch)
    settings = RotationSettings(steps=400, tangent_lr=0.3, rise_limit=1e-3, patience=5, tol=2e-3)
    result = train_rotation(_problem("wanda"), settings, progress=False)
    assert backoff_steps
    assert result.stop_reason in ("plateau", "step floor")
    if result.stop_reason == "plateau":
        assert result.steps - backoff_steps[-1] >= settings.patience


@pytest.mark.parametrize("optimizer", ["cayley", "lbfgs", "paper"])
def test_the_returned_rotations_are_orthogonal_in_float64(optimizer: str) -> None:
    settings = RotationSettings(steps=60, optimizer=optimizer)
    result = train_rotation(_problem("sparsegpt"), settings, progress=False)
    rotation, blocks = result.rotation, result.head_blocks
    assert rotation.dtype == blocks.dtype == torch.float64
    assert torch.linalg.matrix_norm(rotation.T @ rotation - torch.eye(64, dtype=torch.float64)) <= 1e-10
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.linalg.matrix_norm(blocks.transpose(-1, -2) @ blocks - eye).max() <= 1e-10


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_bf16_weight_products_keep_the_loss_and_gradient_close(score: str) -> None:
    """`matmul_precision: medium`: the weight products in bf16 move the loss by < 1e-3 relative
    and keep the gradient's direction (cosine > 0.999); the rounding is real."""
    problem = _problem(score)
    rotation, blocks = (x.float() for x in _random_rotations(problem, 0))
    exact, exact_grads = _value_and_grads(FusedLayerLoss(problem), rotation, blocks)
    rounded, rounded_grads = _value_and_grads(FusedLayerLoss(problem, bf16_products=True), rotation, blocks)
    assert rounded != exact
    assert abs(rounded - exact) <= 1e-3 * abs(exact)
    for a, b in zip(exact_grads, rounded_grads, strict=True):
        cosine = float((a * b).sum() / (a.norm() * b.norm()))
        assert cosine > 0.999


def test_medium_precision_is_bf16_weight_products_and_tf32_elsewhere_on_cuda() -> None:
    from denoiserotator.method.rotation.fused_loss import bf16_products_for, loss_matmul_precision

    assert bf16_products_for("medium", torch.device("cuda"))
    assert not bf16_products_for("high", torch.device("cuda"))
    assert not bf16_products_for("highest", torch.device("cpu"))
    before = torch.get_float32_matmul_precision()
    with loss_matmul_precision("medium", torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high"  # the statistics' products: TF32
    with loss_matmul_precision("medium", torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize(("rows", "columns", "with_factor"), [(True, False, True), (True, True, False)])
def test_the_compiled_entropy_kernel_matches_the_eager_one(
    rows: bool, columns: bool, with_factor: bool
) -> None:
    """Above `COMPILE_MIN_ELEMENTS` a CPU matrix goes through torch.compile; value and both
    gradients agree with the eager formulas (and those with autograd of `linear_entropy`)."""
    from denoiserotator.method.rotation import loss as entropy

    generator = torch.Generator().manual_seed(0)
    shape = (1024, entropy.COMPILE_MIN_ELEMENTS // 1024)
    weight = torch.randn(shape, generator=generator)
    weight[3] = 0.0  # an all-zero row group
    factor = torch.rand(shape[1], generator=generator) + 0.5 if with_factor else None
    compiled = entropy._value_and_grads(weight, factor, rows, columns, True)
    assert "kernel" in entropy._compiled  # the compiled path was taken
    eager = entropy._entropy_value_and_grads(weight, factor, rows, columns, True)
    assert not entropy._compiled.get("failed")
    leaf = weight.clone().requires_grad_(True)
    leaf_factor = None if factor is None else factor.clone().requires_grad_(True)
    reference = linear_entropy(leaf, leaf_factor, rows=rows, columns=columns)
    autograd = torch.autograd.grad(reference, [leaf] + ([leaf_factor] if with_factor else []))
    assert float(compiled[0]) == pytest.approx(float(eager[0]), rel=1e-6)
    assert float(eager[0]) == pytest.approx(float(reference.detach()), rel=1e-6)
    for index, expected in enumerate(autograd, start=1):
        for got in (compiled[index], eager[index]):
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
