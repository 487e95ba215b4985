"""Where does DenoiseRotator's damage to Magnitude pruning come from? Per-layer evidence, JSON out.

Runs the true-sequential pipeline (each layer's input = outputs of the already processed,
pruned layers) on the first `--layers` decoder layers of SmolLM2-135M (0 = all 30) in several
*modes*, each on its own pruned trajectory, and records per layer and per linear:

- `linear_err[name]`: relative output error of the linear on the inputs it sees when it is
  pruned, sqrt(tr(D H Dᵀ) / tr(W H Wᵀ)), D = W_pruned - W, H = Gram of its inputs (true
  sequential: earlier groups already pruned). Orthogonal rotations preserve norms, so this is
  comparable between bases.
- `local_err`: ‖f_pruned(h) - f_dense(h)‖ / ‖f_dense(h) - h‖ on this mode's own layer input h
  (the damage this layer adds, relative to its residual update).
- `drift`: ‖h_mode - h_dense‖ / ‖h_dense‖ after the layer, on held-out windows (accumulated);
  `drift_normed`: the same on per-token RMS-normalised states (massive activations dominate
  the plain norm).
- `dead_columns[name]`: fraction of input columns with ≥ 90 % of their weights pruned.
- `act_spread`: max/median of the input column norms sqrt(H_jj) of the attention and MLP
  inputs in the mode's basis (large-activation channels), `gamma_spread`: max/median of |γ|,
  `top_channel_pruned[name]`: fraction of the weights pruned in the input column with the
  largest activations.
- entropies before/after from the rotation training.

At the end `nll`: next-token NLL (and its exp) of the truncated model (final norm + lm_head
on the last processed layer's output) on held-out SOTU-test windows; with `--layers 0` this
is the model's perplexity on those windows.

Modes: `plain` (original weights, no folding), `fold` (RMSNorm scales folded into the
linears, identity rotation: 0 steps), `rotate:S` (fold + R1/R2 learned for S steps with the
paper's fp32 loss), `rotate-ref:S` (the same with `loss_variant: reference`, the reference
code's bf16 loss); either takes an optimizer as a third field (`rotate-ref:100:paper` is the
reference code's recipe: Adam on the QR parametrisation, bf16 loss; default: the package's) and
further `FIELD=VALUE` rotation settings (`rotate:100:loss_score=magnitude`). A `+METHOD` suffix
refines every pruned linear after its pruner (`plain+swaps`, `rotate:100+lsq`; the package's
`refine_weight` at the `refinement` section's defaults, on the Gram the pruner saw).
Pruners: `magnitude` (one threshold per matrix, as the package and the reference code),
`magnitude-row` (diagnostic only: one threshold per output row), `wanda`, `sparsegpt`.

Quick study (10–30 minutes on one core, depending on the machine's load):

    .venv/bin/python -m bench.magnitude_study --layers 6 --steps 100 \
        --pruners magnitude magnitude-row --patterns 50% \
        --modes plain fold rotate:100 --out bench/results/magnitude_study.json

The equal-settings grid against the reference recipe (docs/studies.md; 3 calibration seeds, Wanda and
SparseGPT at 50 % and 2:4, whole model, perplexity on 64 × 512 held-out tokens; one core per
run, run times in the README and in each run's `seconds`; `bench/gap_table.py` turns the JSON
into the table):

    .venv/bin/python -m bench.magnitude_study --layers 0 --nsamples 32 --seqlen 512 \
        --eval-windows 64 --skip-local-err --seeds 0 1 2 --pruners wanda sparsegpt \
        --patterns 50% 2:4 --modes plain rotate:100 rotate-ref:100:paper \
        --out bench/results/equal_settings.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from denoiserotator.files.assets import fetch_corpus, fetch_smollm2
from denoiserotator.files.export import load_model
from denoiserotator.files.text import calibration_ids, perplexity_ids
from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter
from denoiserotator.method.engine import capture_layer_inputs, run_layer
from denoiserotator.method.pruners import PruneResult, lowest_k_mask, parse_pattern, prune_weight
from denoiserotator.method.pruners.refine import refine_weight
from denoiserotator.method.rotation.fuse import RotatedLayer, fold_layer_norms, fuse_layer_rotation
from denoiserotator.method.sequential import PruneSettings, learn_rotations, to_basis
from denoiserotator.method.statistics import input_statistics
from denoiserotator.settings import PruningSettings, RefinementSettings, RotationSettings

REPO = Path(__file__).resolve().parents[1]


def _spread(values: torch.Tensor) -> float:
    values = values.abs().float()
    return float(values.max() / values.median().clamp_min(1e-12))


def _prune(
    pruner: str, weight: torch.Tensor, gram: torch.Tensor, pattern: str, refine: str = "none"
) -> torch.Tensor:
    spec = parse_pattern(pattern)
    if pruner == "magnitude-row" and spec.kind != "nm":
        keep = lowest_k_mask(weight.abs().float(), int(weight.shape[1] * spec.sparsity))
        pruned = PruneResult(weight.masked_fill(~keep, 0), keep)
    else:
        name = "magnitude" if pruner == "magnitude-row" else pruner
        pruned = prune_weight(name, weight, gram, spec)
    if refine != "none":  # the package's refinement, at its default settings
        settings = RefinementSettings()
        pruned.weight = refine_weight(
            weight, pruned.weight, pruned.mask, gram, spec, refine,  # type: ignore[arg-type]
            max_swaps=settings.max_swaps, candidates=settings.candidates, percdamp=PruningSettings().percdamp,
        ).weight  # fmt: skip
    return pruned.weight.to(weight.dtype)


def _relative_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    d, w, h = (pruned - dense).double(), dense.double(), gram.double()
    return math.sqrt(float(torch.trace(d @ h @ d.T)) / max(float(torch.trace(w @ h @ w.T)), 1e-30))


def _rms(hidden: torch.Tensor) -> torch.Tensor:
    return hidden * torch.rsqrt(hidden.double().square().mean(-1, keepdim=True).float() + 1e-6)


def _norm_ratio(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).double().square().sum()) for x, y in zip(a, b, strict=True))
    den = sum(float(y.double().square().sum()) for y in b)
    return math.sqrt(num / den)


@torch.no_grad()
def _nll(model: nn.Module, hidden: list[torch.Tensor], ids: torch.Tensor) -> float:
    adapter = get_adapter(model)
    total, count, start = 0.0, 0, 0
    for batch in hidden:
        logits = adapter.head_logits(batch).float()
        labels = ids[start : start + batch.shape[0], 1:]
        start += batch.shape[0]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += labels.numel()
    return total / count


def run_mode(
    model: nn.Module,
    originals: list[nn.Module],
    calib: list[torch.Tensor],
    held: list[torch.Tensor],
    kwargs: list[dict[str, Any]],
    dense_held: list[list[torch.Tensor]],
    pruner: str,
    pattern: str,
    mode: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One trajectory: `mode` on the first len(originals) layers of `model` (restored first)."""
    adapter = get_adapter(model)
    for index, layer in enumerate(originals):
        adapter.layers[index] = copy.deepcopy(layer)
    base_mode, _, refine = mode.partition("+")  # plain+swaps, rotate:100+lsq: refined after pruning
    refine = refine or "none"
    rotation: RotationSettings | None = None
    if base_mode == "fold":
        rotation = RotationSettings(steps=0)
    elif base_mode.startswith("rotate"):
        # rotate[-ref]:STEPS[:OPTIMIZER][:FIELD=VALUE...]; unset fields keep the package's defaults
        kind, steps, *fields = base_mode.split(":")
        extra: dict[str, Any] = {"loss_variant": "reference" if kind == "rotate-ref" else "paper"}
        for field in fields:
            key, _, value = field.rpartition("=")
            extra[key or "optimizer"] = yaml.safe_load(value) if key else value  # r1_blocks=4: an int
        rotation = RotationSettings(steps=int(steps), **extra)
    base_pruner = "magnitude" if pruner == "magnitude-row" else pruner
    settings = PruneSettings(pruner=base_pruner, pattern=pattern, rotation=rotation)
    layers: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index in range(len(originals)):
        view = adapter.layer(index)
        record: dict[str, Any] = {"layer": index}
        record["gamma_spread"] = {
            "attn": _spread(view.input_norm.weight.data),
            "mlp": _spread(view.post_attention_norm.weight.data),
        }
        r1 = None
        if rotation is not None:
            fold_layer_norms(view)
            r1, blocks, trained = learn_rotations(
                view, index, adapter, calib, kwargs[index], settings, "", False
            )
            fuse_layer_rotation(view, r1, blocks, adapter.num_heads)
            record.update({k: trained[k] for k in ("entropy_before", "entropy_after", "rotation_best_step")})
        inside = to_basis(calib, r1)
        linears = view.linears()
        record["linear_err"], record["dead_columns"], record["act_spread"], record["top_channel_pruned"] = (
            {},
            {},
            {},
            {},
        )
        for group_name, group in adapter.input_groups.items():
            # the group's linears share their input: one Gram (the pipeline does the same)
            shared = input_statistics(view.layer, linears, group[:1], inside, kwargs[index])[group[0]]
            grams = dict.fromkeys(group, shared)
            norms = torch.diagonal(shared).clamp_min(0).sqrt()
            top = int(norms.argmax())
            if group_name in ("attention_in", "mlp_in"):
                record["act_spread"][group_name] = _spread(norms)
            for name in group:
                dense = linears[name].weight.data.clone()
                pruned = _prune(pruner, dense, grams[name], pattern, refine)
                linears[name].weight.data = pruned
                record["linear_err"][name] = _relative_error(dense, pruned, grams[name])
                dead = (pruned == 0).float().mean(dim=0) >= 0.9
                record["dead_columns"][name] = float(dead.float().mean())
                # the input column that carries the largest activations: how much of it was cut
                record["top_channel_pruned"][name] = float((pruned[:, top] == 0).float().mean())
        finished = RotatedLayer(view.layer, r1) if r1 is not None else view.layer
        outputs = run_layer(finished, calib, kwargs[index])
        if not args.skip_local_err:
            reference = run_layer(originals[index], calib, kwargs[index])
            record["local_err"] = _norm_ratio(
                [o - h for o, h in zip(outputs, calib, strict=True)],
                [r - h for r, h in zip(reference, calib, strict=True)],
            )
        held = run_layer(finished, held, kwargs[index])
        record["drift"] = _norm_ratio(held, dense_held[index])
        # per-token RMS-normalised: what the next norm sees, not dominated by massive activations
        record["drift_normed"] = _norm_ratio([_rms(h) for h in held], [_rms(h) for h in dense_held[index]])
        calib = outputs
        layers.append(record)
        print(
            json.dumps(
                {
                    "pruner": pruner,
                    "pattern": pattern,
                    "mode": mode,
                    **{k: record.get(k) for k in ("layer", "local_err", "drift", "drift_normed")},
                }
            ),
            file=sys.stderr,
        )
    return {"layers": layers, "held": held, "seconds": round(time.perf_counter() - started, 1)}


def summarise(layers: list[dict[str, Any]]) -> dict[str, Any]:
    mean = {name: sum(r["linear_err"][name] for r in layers) / len(layers) for name in LINEAR_NAMES}
    return {
        "mean_linear_err": mean,
        "mean_local_err": (
            sum(r["local_err"] for r in layers) / len(layers) if "local_err" in layers[0] else None
        ),
        "final_drift": layers[-1]["drift"],
        "final_drift_normed": layers[-1]["drift_normed"],
        "mean_dead_columns": {
            name: sum(r["dead_columns"][name] for r in layers) / len(layers) for name in LINEAR_NAMES
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model_dir = fetch_smollm2(args.cache)
    corpus = fetch_corpus(args.cache)
    model, tokenizer = load_model(model_dir)
    adapter = get_adapter(model)
    count = args.layers or adapter.num_layers
    originals = [copy.deepcopy(adapter.layers[i]) for i in range(count)]
    stream = perplexity_ids(tokenizer, f"json:{corpus / 'sotu-test.jsonl'}", args.seqlen)
    test_ids = stream[: args.eval_windows * args.seqlen].reshape(args.eval_windows, args.seqlen)
    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (Q4_1 dequantised to fp32)",
        "layers": count,
        "calibration": f"sotu-train, {args.nsamples} x {args.seqlen}, seeds {args.seeds}",
        "held_out": f"sotu-test, {args.eval_windows} x {args.seqlen}",
        "threads": args.threads,
        "runs": [],
    }
    for seed in args.seeds:
        calib_ids = calibration_ids(
            tokenizer, f"json:{corpus / 'sotu-train.jsonl'}", args.nsamples, args.seqlen, seed=seed
        )
        batch = args.batch
        calib_in = capture_layer_inputs(adapter, calib_ids, batch, torch.device("cpu"), torch.float32)
        held_in = capture_layer_inputs(adapter, test_ids, batch, torch.device("cpu"), torch.float32)
        dense_held, hidden = [], held_in.hidden
        for index in range(count):
            hidden = run_layer(originals[index], hidden, calib_in.layer_kwargs[index])
            dense_held.append(hidden)
        dense_nll = _nll(model, dense_held[-1], test_ids)
        report["runs"].append(
            {"seed": seed, "pruner": "none", "mode": "dense", "nll": dense_nll, "ppl": math.exp(dense_nll)}
        )
        for pruner in args.pruners:
            for pattern in args.patterns:
                for mode in args.modes:
                    result = run_mode(
                        model, originals, calib_in.hidden, held_in.hidden, calib_in.layer_kwargs,
                        dense_held, pruner, pattern, mode, args,
                    )  # fmt: skip
                    nll = _nll(model, result["held"], test_ids)
                    report["runs"].append({
                        "seed": seed, "pruner": pruner, "pattern": pattern, "mode": mode, "nll": nll,
                        "ppl": math.exp(nll), "seconds": result["seconds"], **summarise(result["layers"]),
                        "layers": result["layers"],
                    })  # fmt: skip
                    print(
                        json.dumps({k: v for k, v in report["runs"][-1].items() if k != "layers"}),
                        file=sys.stderr,
                    )
                    _write(args.out, report)  # partial results survive an interrupted study
    return report


def _write(out: Path | None, report: dict[str, Any]) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/main/resources"))
    parser.add_argument("--layers", type=int, default=6, help="first N decoder layers (0 = all)")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward (divides both counts)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100, help="unused unless a mode is plain 'rotate'")
    parser.add_argument("--pruners", nargs="+", default=["magnitude", "magnitude-row"])
    parser.add_argument("--patterns", nargs="+", default=["50%"])
    parser.add_argument("--modes", nargs="+", default=["plain", "fold", "rotate:100"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-local-err", action="store_true", help="no dense pass per layer for local_err")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.modes = [f"{m}:{args.steps}" if m in ("rotate", "rotate-ref") else m for m in args.modes]
    report = run(args)
    _write(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
