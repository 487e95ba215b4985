"""The cost model (denoiserotator.plan.flops) counts what the code computes: its matmul FLOPs equal what
torch's FlopCounterMode reports for the same code on small shapes; the resource requests use it.

FlopCounterMode counts mm/addmm/bmm (and eager attention's matmuls); it does not count QR, Cholesky,
triangular solves, `addr_`, elementwise work, in-place `addmm_` or CPU SDPA kernels, so the tests
use eager attention and accumulate Gram matrices out of place (same arithmetic).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from denoiserotator.method.adapters import get_adapter
from denoiserotator.method.engine import capture_layer_inputs
from denoiserotator.method.gram import GramAccumulator
from denoiserotator.method.pruners import parse_pattern, prune_weight
from denoiserotator.method.pruners.refine import refine_weight
from denoiserotator.method.pruners.sparsegpt import sparsegpt_prune
from denoiserotator.method.rotation.orthogonal import orthogonal_from
from denoiserotator.method.rotation.problem import LayerProblem, layer_loss
from denoiserotator.method.statistics import input_statistics
from denoiserotator.plan import costs, flops
from denoiserotator.plan.experiment import Experiment
from denoiserotator.testing import tiny_model
from tests.conftest import ROOT
from tests.plan.test_experiment import load

SHAPE = flops.LayerShape(hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=48, layers=1)


def counted(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def _random_problem(score: str, seed: int) -> LayerProblem:
    """A rotation problem of SHAPE with random weights and input Grams."""
    generator = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(o, i, generator=generator) for n, (o, i) in SHAPE.linears().items()}
    grams = {}
    for name in ("q", "o", "gate", "down"):
        x = torch.randn(100, SHAPE.linears()[name][1], generator=generator)
        grams[name] = x.T @ x
    return LayerProblem.from_layer(weights, grams, score, SHAPE.heads, SHAPE.kv_heads, SHAPE.head_dim)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("learn_r2", [True, False])
def test_rotation_step_matmuls_equal_the_flop_counter(score: str, learn_r2: bool) -> None:
    """One step's forward + backward (QR included) as train_rotation runs it."""
    problem = _random_problem(score, seed=0)
    free = torch.eye(SHAPE.hidden).requires_grad_(True)
    blocks = torch.eye(SHAPE.head_dim).repeat(SHAPE.kv_heads, 1, 1).requires_grad_(learn_r2)

    def step() -> None:
        layer_loss(problem, orthogonal_from(free), orthogonal_from(blocks), "paper").backward()

    assert flops.rotation_step(SHAPE, score, learn_r2).matmul == counted(step)


@pytest.mark.parametrize("optimizer", ["paper", "cayley", "lbfgs"])
@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("learn_r2", [True, False])
def test_rotation_training_counts_the_selected_optimizers_work(
    optimizer: str, score: str, learn_r2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole `train_rotation` of a few steps with each optimizer, as the prune job runs it: the
    cost model's matmuls equal the counter's (the default `cayley` must not be priced as `paper`).
    The fused backward accumulates with in-place `addmm_`, which the counter misses: it is made
    out of place here (same arithmetic)."""
    from denoiserotator.method.rotation.train import train_rotation
    from denoiserotator.settings import RotationSettings

    problem = _random_problem(score, seed=1)
    steps = 3
    # no stopping rule and no back-off: every step takes the path the model counts
    settings = RotationSettings(
        steps=steps,
        optimizer=optimizer,
        learn_r2=learn_r2,
        tol=0.0,
        backoff=0,
        rise_limit=1e9,
        tangent_lr=1e-4,
        first_step=1e-4,
    )

    def addmm_out_of_place(self: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.copy_(torch.addmm(self, first, second))

    monkeypatch.setattr(torch.Tensor, "addmm_", addmm_out_of_place)
    results = []
    measured = counted(lambda: results.append(train_rotation(problem, settings, progress=False)))
    assert results[0].steps == steps
    if optimizer == "lbfgs":
        assert results[0].evaluations == steps + 1  # no rejected line-search trial
    modelled = flops.rotation_training(SHAPE, score, steps, learn_r2, optimizer=optimizer)
    assert modelled.matmul == measured


def test_the_default_optimizer_is_priced_at_its_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prune job's time request follows `rotation.optimizer`: the default `cayley` (fused loss,
    no QR) is cheaper per step than `paper`, so pricing it as `paper` asked for far too long."""
    monkeypatch.setenv(costs.GPU_MODEL_VARIABLE, "a100")
    config = load("config.yaml")
    exp = Experiment(config)
    assert exp.rotation.optimizer == "cayley"
    eight = flops.LayerShape.from_entry(exp.models["llama3-8b"])
    assert eight is not None
    paper = flops.rotation_training(eight, "wanda", 100, optimizer="paper")
    cayley = flops.rotation_training(eight, "wanda", 100, optimizer="cayley")
    assert paper.matmul > 1.2 * cayley.matmul
    variant = "sparsegpt_50pct_dr-00000000"
    as_paper = Experiment({**config, "rotation": {**config["rotation"], "optimizer": "paper"}})
    assert costs.prune_work(exp, "llama3-70b", True, variant).total == pytest.approx(
        costs.prune_work(as_paper, "llama3-70b", True, variant).total
        - flops.LayerShape.from_entry(exp.models["llama3-70b"]).layers  # type: ignore[union-attr]
        * (
            flops.rotation_training(*_training_args(exp, "llama3-70b"), optimizer="paper").total
            - flops.rotation_training(*_training_args(exp, "llama3-70b"), optimizer="cayley").total
        )
    )
    assert costs.runtime(exp, "llama3-70b", "prune", True, variant=variant) < 0.8 * costs.runtime(
        as_paper, "llama3-70b", "prune", True, variant=variant
    )


def _training_args(exp: Experiment, model: str) -> tuple:
    shape = flops.LayerShape.from_entry(exp.models[model])
    return shape, "sparsegpt", exp.rotation.steps, exp.rotation.learn_r2, exp.rotation.loss_variant, "tf32"


def test_layer_forward_and_gram_collection_equal_the_flop_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama", attn_implementation="eager")
    adapter = get_adapter(model)
    nsamples, seqlen = 4, 24
    ids = torch.randint(3, 300, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    inputs = capture_layer_inputs(adapter, ids, 2, torch.device("cpu"), torch.float32)

    real_add = GramAccumulator.add

    def add_out_of_place(self: GramAccumulator, x: torch.Tensor) -> None:
        if self.gram.dim() == 1:  # Wanda's diagonal: elementwise, the real code as it runs
            return real_add(self, x)
        flat = x.reshape(-1, x.shape[-1]).to(self.gram.dtype)
        self.gram = torch.addmm(self.gram, flat.T, flat)  # what addmm_ computes, visible to the counter
        self.tokens += flat.shape[0]

    monkeypatch.setattr(GramAccumulator, "add", add_out_of_place)
    shape = flops.LayerShape.from_hf_config(model.config)
    view = adapter.layer(0)
    for names in (("q", "o", "gate", "down"), ("q", "k", "v"), ("down",)):
        for diagonal in (False, True):  # Wanda's diagonals: elementwise, only the forward's matmuls count

            def collect(n: tuple[str, ...] = names, d: bool = diagonal) -> None:
                kwargs = inputs.layer_kwargs[0]
                input_statistics(view.layer, view.linears(), n, inputs.hidden, kwargs, diagonal=d)

            measured = counted(collect)
            modelled = flops.input_statistics(
                shape, names, nsamples * seqlen, seqlen, "fp32", "fp64", diagonal=diagonal
            )
            assert modelled.matmul == measured


@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_sparsegpt_lazy_updates_equal_the_flop_counter(pattern: str) -> None:
    """The counter sees only the lazy block updates; the model's other terms (Cholesky, addr_) it
    cannot see, and the model says so by not counting them."""
    rows, cols, blocksize = 24, 72, 16
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator)
    x = torch.randn(200, cols, generator=generator)
    parsed = parse_pattern(pattern)
    nm = parsed.m if parsed.kind == "nm" else None
    measured = counted(lambda: sparsegpt_prune(weight, x.T @ x, parsed, blocksize=blocksize))
    gram_flops = 2 * 200 * cols * cols  # the x.T @ x above
    work = flops.sparsegpt_linear(rows, cols, blocksize, nm)
    assert work.matmul == measured - gram_flops
    assert work.flops["fp64"] == pytest.approx(4 / 3 * cols**3)


@pytest.mark.parametrize("method", ["lsq", "swaps"])
@pytest.mark.parametrize("pattern", ["50%", "2:4"])
def test_the_refinement_products_equal_the_flop_counter(method: str, pattern: str) -> None:
    """`refine_linear` counts the products the refinement runs (objectives, the least-squares
    residuals of its `LSQ_SOLVE_STEPS` solve steps, the swaps' first g); its Cholesky solves and
    elementwise search the counter cannot see."""
    rows, cols = 40, 64
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(rows, cols, generator=generator)
    x = torch.randn(300, cols, generator=generator)
    gram = x.T @ x
    parsed = parse_pattern(pattern)
    pruned = prune_weight("wanda", weight, gram, parsed)
    measured = counted(
        lambda: refine_weight(weight, pruned.weight, pruned.mask, gram, parsed, method, max_swaps=4)
    )
    work = flops.refine_linear(method, rows, cols, parsed.sparsity, 4, 16, parsed.m if parsed.is_nm else None)
    assert work.matmul == measured
    # the fp32 Cholesky factors and triangular solves are priced, though not counted
    assert work.flops["fp32"] >= parsed.sparsity**3 * rows * cols**3 / 3


def test_perplexity_forward_equals_the_flop_counter() -> None:
    model = tiny_model("llama", attn_implementation="eager", num_layers=3)
    seqlen, windows = 16, 3
    ids = torch.randint(3, 300, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        measured = counted(lambda: model(input_ids=ids, use_cache=False))
    shape = flops.LayerShape.from_hf_config(model.config)
    assert flops.perplexity_forward(shape, windows * seqlen, seqlen).matmul == measured


def test_paper_model_step_counts_match_the_issue_figures() -> None:
    """Sanity of scale, from config/config.yaml's shapes: ≈5.3 TFLOP (8B) and ≈41 TFLOP (70B) of
    matmuls per Wanda-scored step."""
    exp = Experiment(load("config.yaml"))
    eight = flops.LayerShape.from_entry(exp.models["llama3-8b"])
    seventy = flops.LayerShape.from_entry(exp.models["llama3-70b"])
    assert eight is not None and seventy is not None
    assert flops.rotation_step(eight, "wanda").matmul == pytest.approx(5.27e12, rel=0.01)
    assert flops.rotation_step(seventy, "wanda").matmul == pytest.approx(41.4e12, rel=0.01)
    # the shape fields reproduce the published parameter counts (decoder linears + embeddings)
    assert (eight.layers * eight.layer_params + 2 * 128256 * 4096) / 1e9 == pytest.approx(8.03, rel=0.01)


def test_prune_runtime_follows_the_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(costs.GPU_MODEL_VARIABLE, "a100")
    config = load("config.yaml")
    exp = Experiment(config)
    rotated = costs.runtime(exp, "llama3-70b", "prune", rotated=True, variant="sparsegpt_50pct_dr-00000000")
    plain = costs.runtime(exp, "llama3-70b", "prune", rotated=False, variant="sparsegpt_50pct_none")
    magnitude = costs.runtime(exp, "llama3-70b", "prune", rotated=True, variant="magnitude_50pct_dr-00000000")
    modelled = costs.prune_seconds(exp, "llama3-70b", True, "sparsegpt_50pct_dr-00000000")
    assert rotated == int(20 + 6 * 70.6 + costs.COMPUTE_MARGIN * modelled / 60)
    assert plain < magnitude < rotated  # no rotation < no statistics < Wanda-scored rotation + Grams
    # an H100 profile asks for less time than an A100 one
    monkeypatch.setenv(costs.GPU_MODEL_VARIABLE, "h100")
    assert costs.runtime(exp, "llama3-70b", "prune", rotated=True) < rotated
    monkeypatch.setenv(costs.GPU_MODEL_VARIABLE, "a100")
    # more steps, more time; without a shape, the params_b fallback of before
    config["rotation"]["steps"] = 4000
    assert costs.runtime(Experiment(config), "llama3-70b", "prune", rotated=True) > rotated
    del config["models"][1]["shape"]
    fallback = costs.runtime(Experiment(config), "llama3-70b", "prune", rotated=True)
    assert fallback == int(20 + 6 * 70.6 + 1.5 * 4000 * 0.124 * 32 * (70.6 / 8) / 60)


def test_gpu_check_quick_runs_on_cpu(tmp_path: Path) -> None:
    """`bench/gpu_check.py --device cpu --quick`: every part runs its CPU path or says why it skips."""
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick"]
    proc = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert set(parts) == {"rotation_step", "workflow", "smollm2", "sparse24"}
    assert parts["workflow"]["status"] == "skipped" and parts["workflow"]["reason"]
    for name in ("rotation_step", "smollm2", "sparse24"):
        assert parts[name]["status"] == "ok", parts[name]
    assert parts["rotation_step"]["modes"]["fp32"]["seconds_per_step"] > 0
    assert parts["rotation_step"]["modes"]["tf32"]["reason"]
    assert parts["smollm2"]["runs"]["cpu_fp32"]["ppl"] > 1
    assert parts["sparse24"]["sparse24"]["reason"]


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_the_loss_statistics_counted_are_the_ones_the_loss_builds(variant: str) -> None:
    from denoiserotator.method.rotation.problem import loss_statistic_inputs

    assert flops.loss_statistic_linears(variant) == list(loss_statistic_inputs(variant).values())


def test_zeroshot_time_follows_the_tokens_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-shot request counts lm-eval's scored tokens at the GPU's rate in the model's dtype:
    LLaMA-3-8B in fp32 asked for 68 min (loading time only), short of the ≈ 90 min it needs."""
    monkeypatch.setenv(costs.GPU_MODEL_VARIABLE, "a100")
    config = load("config.yaml")
    exp = Experiment(config)
    tokens = costs.zeroshot_tokens(exp)
    assert tokens == sum(items * choices * per for items, choices, per in costs.ZEROSHOT_REQUESTS.values())
    minutes = costs.runtime(exp, "llama3-8b", "zeroshot")
    seconds = flops.seconds(flops.zeroshot_forward(8.0e9, tokens, "fp32"), flops.DEVICES["a100"])
    assert minutes == int(20 + 6 * 8.0 + costs.COMPUTE_MARGIN * seconds / 60) and minutes > 90
    limited = Experiment(
        {**config, "eval": {**config["eval"], "zeroshot": {**config["eval"]["zeroshot"], "limit": 100}}}
    )
    assert (
        costs.zeroshot_tokens(limited) < tokens / 10
        and costs.runtime(limited, "llama3-8b", "zeroshot") < minutes
    )
