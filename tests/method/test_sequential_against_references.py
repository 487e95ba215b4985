"""Tests that pin the method's wiring (SPEC §2–§5), not just its zero counts.

The first block compares `run_pipeline` with a slow, independent re-implementation of the
per-layer procedure: fold norms → Gram matrices on the current inputs → a FIXED rotation
(training is patched out) → fuse → for each true-sequential group [q,k,v] → [o] → [gate,up]
→ [down] re-collect Gram matrices on the rotated, partly pruned layer and prune → the
finished layer's outputs feed the next layer. Mutants of the pipeline (no re-collection,
reversed groups, Gram matrices in the unrotated basis) must be caught by the comparison.

The second block covers guarantees of the rotation loss and its training loop.

Precision: the pipeline only supports float32 models (`pipeline.DTYPES`), so both sides run
the layers in float32 on identical batches. The only numeric difference is the Gram matrix:
float64 sums of xᵀx in another order (≈1e-16 relative), which the pruners turn into masks
that must be identical and SparseGPT-compensated weights equal to a few float32 ulps.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import denoiserotator.method.rotation.paper as paper_optimizer
import denoiserotator.method.sequential as pipeline
import denoiserotator.method.statistics as statistics
from denoiserotator.method.adapters import LINEAR_NAMES, ModelAdapter, get_adapter
from denoiserotator.method.pruners import parse_pattern, prune_weight
from denoiserotator.method.rotation.fuse import RotatedLayer, fold_layer_norms, fuse_layer_rotation
from denoiserotator.method.rotation.iterate import RotationResult
from denoiserotator.method.rotation.loss import InputStatistic
from denoiserotator.method.rotation.problem import LayerProblem, layer_loss
from denoiserotator.method.rotation.train import train_rotation
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.settings import ComputeSettings, PruningSettings, RotationSettings
from denoiserotator.testing import tiny_model

# The order SPEC §5 prescribes, written out here rather than imported from the adapters.
# Written out, not read from the adapter: the re-implementation states the order itself.
GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
SAMPLES, LENGTH, BATCH = 4, 24, 2
BLOCKSIZE = 32  # < 64 input columns, so SparseGPT's lazy block updates are exercised
PERCDAMP = 0.01
# SparseGPT's compensated weights: a float64 Gram summed in another order, then float32 OBS.
# Today both sides agree bitwise; the tolerance (≈10 float32 ulps) only absorbs a reordered sum.
WEIGHT_ATOL, WEIGHT_RTOL = 1e-7, 1e-6


def calibration(vocab_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (SAMPLES, LENGTH), generator=generator)


def fixed_rotation(layer_index: int, hidden: int, head_dim: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """A deterministic random orthogonal R1 (hidden×hidden) and R2 blocks (kv_heads×hd×hd)."""
    generator = torch.Generator().manual_seed(1000 + layer_index)
    r1 = torch.linalg.qr(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64)).Q
    r2 = torch.linalg.qr(
        torch.randn(kv_heads, head_dim, head_dim, generator=generator, dtype=torch.float64)
    ).Q
    return r1.float(), r2.float()


# --------------------------------------------------------------------------------------
# The slow re-implementation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Layer 0's input per batch and every layer's keyword arguments per batch, by pre-hooks
    on the dense model's decoder layers."""
    adapter = get_adapter(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(adapter.num_layers)]
    handles = []
    for index, layer in enumerate(adapter.layers):

        def hook(_module, args, kw, index=index):
            if index == 0:
                hidden.append(args[0].clone())
            kwargs[index].append(dict(kw))

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for batch in ids.split(BATCH):
            model.model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return hidden, kwargs


def forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def grams_by_hooks(
    layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[torch.Tensor], kwargs: list[dict]
) -> dict[str, torch.Tensor]:
    """Σ xᵀx (float64) of each given linear's inputs while `layer` runs on `inputs`."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, linear in linears.items():

        def hook(_module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        for batch, kw in zip(inputs, kwargs, strict=True):
            forward(layer, batch, kw)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def reference_procedure(
    model: nn.Module, ids: torch.Tensor, pruner: str, pattern: str
) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """Run SPEC §5 step 3 slowly on `model` with the fixed rotations; return per layer the
    pruned weights, biases and keep-masks, and the rotation-stage Grams (original basis)."""
    adapter = get_adapter(model)
    sparsity = parse_pattern(pattern)
    hidden, kwargs = capture_inputs(model, ids)
    layers_out: list[dict[str, Any]] = []
    rotation_grams: list[dict[str, torch.Tensor]] = []
    for index, layer in enumerate(adapter.layers):
        view = adapter.wrap_layer(layer)
        linears = view.linears()
        kw = kwargs[index]
        fold_layer_norms(view)
        rotation_grams.append(grams_by_hooks(layer, linears, hidden, kw))
        r1, r2 = fixed_rotation(index, adapter.hidden_size, adapter.head_dim, adapter.num_kv_heads)
        fuse_layer_rotation(view, r1, r2, adapter.num_heads)
        rotated = [batch @ r1 for batch in hidden]  # what the rotated layer sees
        masks: dict[str, torch.Tensor] = {}
        for group in GROUPS:
            grams = grams_by_hooks(layer, {name: linears[name] for name in group}, rotated, kw)
            for name in group:
                result = prune_weight(
                    pruner, linears[name].weight.data, grams[name], sparsity, blocksize=BLOCKSIZE,
                    percdamp=PERCDAMP,
                )  # fmt: skip
                linears[name].weight.data = result.weight
                masks[name] = result.mask
        with torch.no_grad():
            hidden = [forward(layer, batch @ r1, k) @ r1.T for batch, k in zip(hidden, kw, strict=True)]
        layers_out.append(
            {
                "weights": {name: linears[name].weight.data.clone() for name in LINEAR_NAMES},
                "biases": {
                    name: linears[name].bias.data.clone()
                    for name in LINEAR_NAMES
                    if linears[name].bias is not None
                },
                "masks": masks,
            }
        )
    return layers_out, rotation_grams


def fake_train_rotation(model: nn.Module, seen: list[dict[str, Any]]):
    """Stand-in for `train_rotation`: the fixed rotation of the layer (calls come in layer
    order) and, for the wiring check of the rotation stage, the loss the problem assigns it."""

    adapter = get_adapter(model)

    def fake(problem: LayerProblem, settings: RotationSettings, **_: Any) -> RotationResult:
        index = len(seen)
        r1, r2 = fixed_rotation(index, adapter.hidden_size, adapter.head_dim, adapter.num_kv_heads)
        seen.append({"loss": float(layer_loss(problem, r1, r2, settings.loss_variant))})
        return RotationResult(
            rotation=r1, head_blocks=r2, loss_start=0.0, loss_best=0.0, best_step=0, steps=0, seconds=0.0
        )

    return fake


def run_patched_pipeline(
    monkeypatch: pytest.MonkeyPatch, family: str, pruner: str, pattern: str
) -> tuple[nn.Module, list[torch.Tensor | None], list[dict[str, Any]]]:
    model = tiny_model(family, num_layers=2)
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(pipeline, "train_rotation", fake_train_rotation(model, seen))
    settings = PruneSettings(
        pruner=pruner, pattern=pattern, rotation=RotationSettings(steps=1),
        pruning=PruningSettings(sparsegpt_blocksize=BLOCKSIZE, percdamp=PERCDAMP),
        compute=ComputeSettings(prune_batch_size=BATCH),
    )  # fmt: skip
    result = run_pipeline(model, calibration(model.config.vocab_size), settings, progress=False)
    return result.model, result.rotations, seen


def mismatches(model: nn.Module, reference: list[dict[str, Any]]) -> list[str]:
    """Where the pipeline's finished layers differ from the re-implementation's."""
    adapter = get_adapter(model)
    found = []
    for index, expected in enumerate(reference):
        layer = adapter.layers[index]
        view = adapter.wrap_layer(layer.layer if isinstance(layer, RotatedLayer) else layer)
        for name in LINEAR_NAMES:
            weight = view.linear(name).weight.data
            if not torch.equal(weight != 0, expected["masks"][name]):
                found.append(f"layer {index} {name}: mask")
            elif not torch.allclose(weight, expected["weights"][name], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL):
                found.append(f"layer {index} {name}: weight")
        for name, bias in expected["biases"].items():
            if not torch.allclose(view.linear(name).bias.data, bias, atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL):
                found.append(f"layer {index} {name}: bias")
        for norm in (view.input_norm, view.post_attention_norm):
            if not torch.equal(norm.weight.data, torch.ones_like(norm.weight.data)):
                found.append(f"layer {index}: norm not folded")
    return found


def reference_for(family: str, pruner: str, pattern: str):
    model = tiny_model(family, num_layers=2)
    return reference_procedure(model, calibration(model.config.vocab_size), pruner, pattern)


# --------------------------------------------------------------------------------------
# Scores and entropies from scratch (SPEC §3), float64
# --------------------------------------------------------------------------------------


def column_factor_from_scratch(score: str, gram: torch.Tensor | None, columns: int) -> torch.Tensor:
    """Per-input-column multiplier of W² for `gram` already in the weight's input basis."""
    if score == "magnitude":
        return torch.ones(columns, dtype=torch.float64)
    gram = gram.double()
    if score == "wanda":
        return torch.diagonal(gram).clone()
    diagonal = torch.diagonal(gram).clone()
    diagonal[diagonal == 0] = 1.0
    lam = PERCDAMP * diagonal.mean()
    damped = gram.clone()
    damped.diagonal().copy_(diagonal + lam)
    return 1.0 / torch.diagonal(torch.linalg.inv(damped))


def entropy_of_groups(scores: torch.Tensor, dim: int) -> float:
    total = 0.0
    for group in scores.unbind(1 - dim):  # dim=1: rows are the groups
        mass = float(group.sum())
        if mass == 0:
            continue
        for value in (group / mass).tolist():
            if value > 0:
                total -= value * math.log(value)
    return total


# Which side of each weight a rotation touches, so which groups are normalised (SPEC §3).
GROUPING = {
    "q": (True, False),
    "k": (True, False),
    "v": (True, True),
    "o": (True, True),
    "gate": (True, False),
    "up": (True, False),
    "down": (False, True),
}


def entropy_from_scratch(
    weights: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], score: str
) -> float:
    """Plain sum over the seven linears and their groups of −Σ p log p of S = W²·factor."""
    loss = 0.0
    for name, weight in weights.items():
        weight = weight.double()
        factor = column_factor_from_scratch(score, grams.get(name), weight.shape[1])
        scores = weight.square() * factor[None, :]
        rows, columns = GROUPING[name]
        if rows:
            loss += entropy_of_groups(scores, dim=1)
        if columns:
            loss += entropy_of_groups(scores, dim=0)
    return loss


def rotation_stage_loss(family: str, index: int, grams: dict[str, torch.Tensor], score: str) -> float:
    """Scratch entropy of layer `index`'s folded and fused (unpruned) weights under the fixed
    rotation, with original-basis Grams `grams` rotated into the layer's basis."""
    adapter = get_adapter(tiny_model(family, num_layers=2))
    view = adapter.layer(index)
    fold_layer_norms(view)
    r1, r2 = fixed_rotation(index, adapter.hidden_size, adapter.head_dim, adapter.num_kv_heads)
    fuse_layer_rotation(view, r1, r2, adapter.num_heads)
    r1 = r1.double()
    r2o = torch.block_diag(*r2.double().repeat_interleave(adapter.num_heads // adapter.num_kv_heads, dim=0))
    rotated = {name: r1.T @ grams[name] @ r1 for name in ("q", "k", "v", "gate", "up")}
    rotated["o"] = r2o.T @ grams["o"] @ r2o
    rotated["down"] = grams["down"]
    weights = {name: linear.weight.data for name, linear in view.linears().items()}
    return entropy_from_scratch(weights, rotated, score)


# --------------------------------------------------------------------------------------
# 1. The pipeline equals the slow re-implementation
# --------------------------------------------------------------------------------------

CASES = [
    *[
        ("qwen2", pruner, pattern)
        for pruner in ("magnitude", "wanda", "sparsegpt")
        for pattern in ("50%", "2:4")
    ],
    ("llama", "sparsegpt", "50%"),
    ("mistral", "wanda", "2:4"),
]


@pytest.mark.parametrize("family,pruner,pattern", CASES)
def test_pipeline_equals_slow_reimplementation(
    monkeypatch: pytest.MonkeyPatch, family: str, pruner: str, pattern: str
) -> None:
    """With a fixed rotation per layer, `run_pipeline` yields the same masks (exactly) and weights
    (to float32 ulps) on both layers as the re-implementation: norms folded, Grams on the
    propagated inputs, fused, each group pruned on Grams re-collected from the rotated, partly
    pruned layer, in the order [q,k,v] → [o] → [gate,up] → [down]. Layer 1 only matches if layer
    0's rotated, pruned outputs are what the pipeline propagated. The loss the rotation stage's
    problem assigns the fixed rotation is the scratch entropy under that layer's current Grams."""
    model, rotations, seen = run_patched_pipeline(monkeypatch, family, pruner, pattern)
    reference, rotation_grams = reference_for(family, pruner, pattern)
    assert mismatches(model, reference) == []
    adapter = get_adapter(model)
    for index, rotation in enumerate(rotations):
        expected = fixed_rotation(index, adapter.hidden_size, adapter.head_dim, adapter.num_kv_heads)[0]
        assert torch.equal(rotation, expected)
    # The rotation stage saw the Grams of its layer's current inputs, in the original basis.
    if pruner != "magnitude":
        for index, grams in enumerate(rotation_grams):
            expected = rotation_stage_loss(family, index, grams, pruner)
            assert seen[index]["loss"] == pytest.approx(expected, rel=1e-5), index


def _cache_first_grams(real):
    """Mutant: Grams of all seven linears collected once on the rotated, unpruned layer."""
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def grams_for(layer, linears, names, hidden, kwargs, until=(), diagonal=False):
        if len(names) != 1:  # the rotation stage (one Gram per input group at once)
            return real(layer, linears, names, hidden, kwargs, until, diagonal)
        if id(layer) not in cache:
            cache[id(layer)] = real(layer, linears, LINEAR_NAMES, hidden, kwargs)
        grams = {name: cache[id(layer)][name] for name in names}
        return {name: torch.diagonal(gram) for name, gram in grams.items()} if diagonal else grams

    return grams_for


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_comparison_detects_missing_recollection(monkeypatch: pytest.MonkeyPatch, pruner: str) -> None:
    """A pipeline that collects the Grams once per layer instead of before every group is caught
    by the comparison with the re-implementation (so the test above can fail)."""
    monkeypatch.setattr(statistics, "input_statistics", _cache_first_grams(statistics.input_statistics))
    model, _, _ = run_patched_pipeline(monkeypatch, "qwen2", pruner, "50%")
    reference, _ = reference_for("qwen2", pruner, "50%")
    found = mismatches(model, reference)
    # q, k, v come first, so the mutant's Grams are right for them in layer 0; later groups' not.
    assert not any(entry.startswith(("layer 0 q:", "layer 0 k:", "layer 0 v:")) for entry in found), found
    assert any(entry.startswith("layer 0 o:") for entry in found), found


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_comparison_detects_wrong_group_order(monkeypatch: pytest.MonkeyPatch, pruner: str) -> None:
    """A pipeline that prunes the groups in reverse order ([down] first) is caught."""
    reversed_groups = dict(reversed(list(ModelAdapter.input_groups.items())))
    monkeypatch.setattr(ModelAdapter, "input_groups", reversed_groups)
    model, _, _ = run_patched_pipeline(monkeypatch, "qwen2", pruner, "2:4")
    reference, _ = reference_for("qwen2", pruner, "2:4")
    assert any(entry.startswith("layer 0 down:") for entry in mismatches(model, reference))


def test_comparison_detects_grams_in_the_unrotated_basis(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline that feeds the rotated layer unrotated inputs while collecting the pruning Grams
    (Grams in the wrong basis) is caught."""
    monkeypatch.setattr(pipeline, "to_basis", lambda hidden, rotation: list(hidden))
    model, _, _ = run_patched_pipeline(monkeypatch, "qwen2", "wanda", "50%")
    reference, _ = reference_for("qwen2", "wanda", "50%")
    assert any(entry.startswith("layer 0 q:") for entry in mismatches(model, reference))


# --------------------------------------------------------------------------------------
# 2. The rotation loss and its training loop
# --------------------------------------------------------------------------------------


def _gram(columns: int, seed: int, tokens: int = 300) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) * torch.linspace(
        0.1, 3.0, columns, dtype=torch.float64
    )
    return x.T @ x


def _orthogonal(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q


def test_reference_variant_adds_damping_again_after_the_inverse() -> None:
    """`loss_variant: reference` SparseGPT factor is 1/(diag(Rᵀ H_λ⁻¹ R) + λ), λ = 0.01·mean diag H;
    the paper variant has no second λ."""
    gram = _gram(12, seed=0)
    rotation = _orthogonal(12, seed=1)
    lam = PERCDAMP * torch.diagonal(gram).mean()
    inverse = torch.linalg.inv(gram + lam * torch.eye(12, dtype=torch.float64))
    inner = torch.diagonal(rotation.T @ inverse @ rotation)
    reference = InputStatistic.from_gram("sparsegpt", gram, variant="reference", percdamp=PERCDAMP)
    paper = InputStatistic.from_gram("sparsegpt", gram, variant="paper", percdamp=PERCDAMP)
    actual = reference.column_factor(rotation.float()).double()
    assert torch.allclose(actual, 1.0 / (inner + lam), rtol=1e-5)
    assert torch.allclose(paper.column_factor(rotation.float()).double(), 1.0 / inner, rtol=1e-4)
    # The second λ dominates the inverse's diagonal: the two variants really differ.
    assert not torch.allclose(actual, 1.0 / inner, rtol=1e-2)


_DOWN_GRAM = _gram(96, 13)


def _layer_problem(score: str, variant: str = "paper", seed: int = 0) -> LayerProblem:
    model = tiny_model("qwen2", num_layers=1, seed=seed)
    view = get_adapter(model).layer(0)
    fold_layer_norms(view)
    grams = {"q": _gram(64, 10), "o": _gram(64, 11), "gate": _gram(64, 12), "down": _DOWN_GRAM}
    weights = {name: linear.weight.data for name, linear in view.linears().items()}
    return LayerProblem.from_layer(weights, grams, score, 4, 2, 16, variant=variant, percdamp=PERCDAMP)


def _scratch_loss(
    problem: LayerProblem, rotation: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype, variant: str
) -> torch.Tensor:
    """The layer loss written out in `dtype` from the frozen weights and Grams (differentiable)."""
    r2v = torch.block_diag(*blocks)
    r2o = torch.block_diag(*blocks.repeat_interleave(problem.num_heads // problem.num_kv_heads, dim=0))
    damping = {key: stat.shift for key, stat in problem.inputs.items()}
    # SparseGPT's statistic is kept as the upper Cholesky factor U of H_λ⁻¹ (UᵀU = H_λ⁻¹).
    matrices = {
        key: stat.matrix.double().T @ stat.matrix.double() if stat.score == "sparsegpt" else stat.matrix
        for key, stat in problem.inputs.items()
        if key != "down"
    }
    # down_proj's factor, as SPEC §3 writes it (the package leaves it out: it cancels in column
    # groups, and this written-out loss shows that nothing changes).
    down = InputStatistic.from_gram(problem.inputs["down"].score, _DOWN_GRAM, percdamp=PERCDAMP)
    damping["down"] = down.shift
    down_matrix = down.matrix.double()
    matrices["down"] = down_matrix.T @ down_matrix if down.score == "sparsegpt" else down_matrix
    w = {name: weight.to(dtype) for name, weight in problem.weights.items()}
    q = rotation.to(dtype)
    fused = {
        "q": w["q"] @ q,
        "k": w["k"] @ q,
        "v": r2v.to(dtype).T @ w["v"] @ q,
        "o": q.T @ w["o"] @ r2o.to(dtype),
        "gate": w["gate"] @ q,
        "up": w["up"] @ q,
        "down": q.T @ w["down"],
    }
    input_rotation = {"attn": rotation, "o": r2o, "mlp": rotation, "down": None}
    key_of = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
    loss = torch.zeros((), dtype=dtype)
    for name, weight in fused.items():
        key = key_of[name]
        r = input_rotation[key]
        matrix = matrices[key].double()
        diagonal = torch.diagonal(matrix) if r is None else torch.diagonal(r.double().T @ matrix @ r.double())
        factor = 1.0 / (diagonal + (damping[key] if variant == "reference" else 0.0))
        scores = weight.square() * factor.to(dtype)[None, :]
        rows, columns = GROUPING[name]
        for dim, used in ((1, rows), (0, columns)):
            if used:
                p = scores / scores.sum(dim=dim, keepdim=True)
                loss = loss - (p * torch.log(p)).sum()
    return loss


def test_reference_variant_computes_the_loss_in_bf16() -> None:
    """`loss_variant: reference` evaluates the SparseGPT loss in bf16: its value is the bf16
    evaluation from scratch (a bf16 number, off the float32 one), and so is its gradient (which
    rounding only the final value to bf16 would leave at float32 accuracy)."""
    problem = _layer_problem("sparsegpt", variant="reference")
    rotation = _orthogonal(64, seed=2).float()
    blocks = torch.stack([_orthogonal(16, seed=3 + i) for i in range(2)]).float()

    def value_and_grad(loss_fn) -> tuple[float, torch.Tensor]:
        free = rotation.clone().requires_grad_(True)
        loss = loss_fn(free)
        loss.backward()
        return float(loss.detach()), free.grad.double()

    value, grad = value_and_grad(lambda r: layer_loss(problem, r, blocks, "reference"))
    scratch = {
        dtype: value_and_grad(lambda r, dtype=dtype: _scratch_loss(problem, r, blocks, dtype, "reference"))
        for dtype in (torch.bfloat16, torch.float32, torch.float64)
    }
    exact_value, exact_grad = scratch[torch.float64]
    fp32_value, fp32_grad = scratch[torch.float32]
    bf16_value, bf16_grad = scratch[torch.bfloat16]
    assert abs(fp32_value - exact_value) <= 1e-6 * abs(exact_value)  # float32 is accurate here
    assert value == float(torch.tensor(value).to(torch.bfloat16).float())
    assert value == pytest.approx(bf16_value, abs=16.0)  # one bf16 ulp at 2048–4096
    assert abs(value - exact_value) > 1e3 * abs(fp32_value - exact_value)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    assert relative(fp32_grad, exact_grad) < 1e-5
    assert relative(grad, bf16_grad) < 1e-4
    assert relative(grad, fp32_grad) > 1e-3
    # The paper variant keeps float32.
    paper = _layer_problem("sparsegpt", variant="paper")
    paper_value = float(layer_loss(paper, rotation, blocks, "paper"))
    expected = float(_scratch_loss(paper, rotation, blocks, torch.float64, "paper"))
    assert paper_value == pytest.approx(expected, rel=1e-5)


def test_pipeline_hands_the_loss_variant_to_the_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    """`PruneSettings.loss_variant = "reference"` reaches both the problem's input statistics
    (λ re-added) and the training settings (bf16 loss)."""
    captured: list[tuple[LayerProblem, RotationSettings]] = []
    real = pipeline.train_rotation

    def spy(problem, settings, **kwargs):
        captured.append((problem, settings))
        return real(problem, settings, **kwargs)

    monkeypatch.setattr(pipeline, "train_rotation", spy)
    model = tiny_model("llama", num_layers=1)
    settings = PruneSettings(
        pruner="sparsegpt", pattern="50%", rotation=RotationSettings(steps=1, loss_variant="reference")
    )
    run_pipeline(model, calibration(model.config.vocab_size), settings, progress=False)
    ((problem, rotation_settings),) = captured
    assert rotation_settings.loss_variant == "reference"
    assert all(stat.variant == "reference" and stat.damping > 0 for stat in problem.inputs.values()
               if stat.matrix is not None)  # fmt: skip


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_learned_loss_is_the_entropy_of_the_fused_layer(monkeypatch: pytest.MonkeyPatch, score: str) -> None:
    """The `entropy_after` the pipeline reports for the learned rotation equals the SPEC §3 entropy,
    computed from scratch, of the weights actually fused into the layer, with the Grams
    re-collected by running the rotated layer on its (rotated) inputs."""
    model = tiny_model("qwen2", num_layers=2)
    ids = calibration(model.config.vocab_size)
    settings = PruneSettings(
        pruner="none",
        pattern=None,
        rotation=RotationSettings(steps=25, lr=0.05, loss_score=score, optimizer="paper"),
        compute=ComputeSettings(prune_batch_size=BATCH),
    )  # fmt: skip
    result = run_pipeline(model, ids, settings, progress=False, merge_boundaries=False)
    adapter = get_adapter(result.model)
    views = [adapter.wrap_layer(layer.layer) for layer in adapter.layers]
    grams: list[dict[str, torch.Tensor]] = [{} for _ in views]
    handles = []
    for index, view in enumerate(views):
        for name, linear in view.linears().items():

            def hook(_module, args, index=index, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[index][name] = grams[index].get(name, 0) + x.T @ x

            handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        result.model(ids)  # the unmerged form: each RotatedLayer rotates its own input
    for handle in handles:
        handle.remove()
    for index, view in enumerate(views):
        stats = result.layer_stats[index]
        assert stats["entropy_after"] < stats["entropy_before"] - 1e-2  # the rotation moved
        weights = {name: linear.weight.data for name, linear in view.linears().items()}
        expected = entropy_from_scratch(weights, grams[index], score)
        assert stats["entropy_after"] == pytest.approx(expected, rel=1e-4), index
        if score != "magnitude":
            # Sensitivity: the Grams of the unrotated basis give a clearly different value.
            rotation = result.rotations[index].double()
            unrotated = {
                name: gram if name in ("o", "down") else rotation @ gram @ rotation.T
                for name, gram in grams[index].items()
            }
            wrong = entropy_from_scratch(weights, unrotated, score)
            assert abs(wrong - expected) > 1e-3 * abs(expected)


class _Ascent(torch.optim.Optimizer):
    """Moves every parameter uphill by a small normalised gradient step: each update raises the loss."""

    def __init__(self, params, lr: float = 0.01, **_adam_options: object) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad / (param.grad.norm() + 1e-12), alpha=1e-3)


def test_best_iterate_falls_back_to_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """When every update raises the loss, the kept iterate is the starting identity (step 0)."""
    monkeypatch.setattr(torch.optim, "Adam", _Ascent)
    problem = _layer_problem("wanda")
    result = train_rotation(problem, RotationSettings(steps=6, optimizer="paper"), progress=False)
    trace = result.loss_trace
    assert len(trace) == 7 and all(later > trace[0] for later in trace[1:])  # the premise
    assert torch.equal(result.rotation, torch.eye(64))
    assert torch.equal(result.head_blocks, torch.eye(16).repeat(2, 1, 1))
    assert result.best_step == 0 and result.loss_best == trace[0] == result.loss_start


@pytest.mark.parametrize("clip", [1e-3, math.inf])
def test_gradient_norm_is_clipped(monkeypatch: pytest.MonkeyPatch, clip: float) -> None:
    """Every update Adam applies sees a total gradient norm (R1 and R2 together) of at most `clip`;
    without clipping the same problem's gradients are far larger (the premise)."""
    norms: list[float] = []
    real_adam = torch.optim.Adam

    class SpyAdam(real_adam):
        def step(self, closure=None):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    train_rotation(
        _layer_problem("wanda"), RotationSettings(steps=5, clip=clip, optimizer="paper"), progress=False
    )
    assert len(norms) == 5
    if math.isinf(clip):
        assert min(norms) > 1.0
    else:
        assert max(norms) <= clip * (1 + 1e-5)


def test_rotation_steps_counts_the_updates_actually_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `rotation_steps` a layer's stats report is the number of optimiser updates that ran:
    here the loss turns non-finite at the 4th evaluation, so 3 of the configured 10."""
    updates: list[int] = []
    real_adam = torch.optim.Adam

    class CountingAdam(real_adam):
        def step(self, closure=None):
            updates[-1] += 1
            return super().step(closure)

    real_loss = paper_optimizer.layer_loss
    evaluations = {"n": 0}

    def poisoned(problem, rotation, blocks, variant):
        evaluations["n"] += 1
        loss = real_loss(problem, rotation, blocks, variant)
        return loss * float("nan") if evaluations["n"] == 4 else loss

    real_train = pipeline.train_rotation

    def train(problem, settings, **kwargs):
        updates.append(0)
        evaluations["n"] = 0
        return real_train(problem, settings, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", CountingAdam)
    monkeypatch.setattr(paper_optimizer, "layer_loss", poisoned)
    monkeypatch.setattr(pipeline, "train_rotation", train)
    model = tiny_model("llama", num_layers=2)
    settings = PruneSettings(
        pruner="wanda",
        pattern="50%",
        rotation=RotationSettings(steps=10, optimizer="paper"),
        compute=ComputeSettings(prune_batch_size=BATCH),
    )
    result = run_pipeline(model, calibration(model.config.vocab_size), settings, progress=False)
    assert updates == [3, 3]  # the premise: both layers stopped early
    assert [stats["rotation_steps"] for stats in result.layer_stats] == updates
