"""Rotation learning speed: the paper recipe against the project's default, side by side.

One real SmolLM2-135M decoder layer (default 10; Grams from 32 x 512 calibration tokens of
sotu-train, collected on the layer's real inputs, i.e. after the dense layers before it),
fp32, one process, same threads. For each score (Wanda, SparseGPT):
  (a) optimizer "paper": SPEC §4 as written (QR every step, Adam lr 0.01, clip 1.0), 400 steps;
  (b) optimizer "cayley" (the default): Adam in the tangent space of the orthogonal group with
      the Cayley retraction, on the fused loss; stopped by its own rule or once it has used
      (a)'s wall time.
Every iterate of both is scored with one shared fp32 loss (`layer_loss`, paper variant;
(a)'s own loss is that function, (b)'s iterates are re-evaluated outside the timers).
Reported: seconds per step, the curves (seconds, loss), (a)'s best loss after its steps,
the time each first reaches it, speedup_to_equal_loss = time(a)/time(b), and (b)'s best
loss within (a)'s wall time. `--synthetic-llama8b` replaces
the real layer by a random LLaMA-3-8B-shaped one (meant for `--device cuda`).

    .venv/bin/python -m bench.rotation_speed --cache /work/cache \\
        --out bench/results/rotation_speed.json

bench/results/rotation_speed.json is the output of the command above, both scores in one
invocation, on the 2-core CPU machine otherwise idle (load averages are in the file). The
CPU-time speedups (process CPU seconds) are reported next to the wall-time ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import study_parser, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def real_layer_data(cache: Path, layer: int, nsamples: int, seqlen: int) -> dict[str, Any]:
    """Norm-folded weights of SmolLM2-135M layer `layer` and the Grams of its linears' inputs.

    The Grams are collected on the layer's real inputs: the calibration windows run through
    the dense layers 0..layer-1. Cached under `cache` (keyed by the arguments).
    """
    from denoiserotator.files.assets import fetch_corpus, fetch_smollm2
    from denoiserotator.files.export import load_model
    from denoiserotator.files.text import calibration_ids
    from denoiserotator.method.adapters import get_adapter
    from denoiserotator.method.engine import capture_layer_inputs, run_layer
    from denoiserotator.method.gram import collect_grams
    from denoiserotator.method.rotation.fuse import fold_layer_norms

    name = f"smollm2-135m/{layer}/{nsamples}/{seqlen}/sotu-train/seed0"
    key = hashlib.sha256(name.encode()).hexdigest()[:12]
    stash = Path(cache) / "bench" / f"rotation_speed_layer{layer}_{key}.pt"
    if stash.exists():
        return torch.load(stash)
    for attempt in range(3):  # another worker may be fetching into the same cache
        try:
            model_dir = fetch_smollm2(cache)
            corpus = fetch_corpus(cache)
            break
        except (OSError, FileExistsError):
            if attempt == 2:
                raise
            time.sleep(10)
    model, tokenizer = load_model(model_dir)
    model.config.use_cache = False
    ids = calibration_ids(tokenizer, f"json:{corpus / 'sotu-train.jsonl'}", nsamples, seqlen, seed=0)
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(adapter, ids, 8, torch.device("cpu"), torch.float32)
    hidden = inputs.hidden
    for index in range(layer):
        hidden = run_layer(adapter.layers[index], hidden, inputs.layer_kwargs[index])
    target = adapter.layers[layer]
    view = adapter.wrap_layer(target)
    fold_layer_norms(view)
    linears = view.linears()
    with collect_grams({name: linears[name] for name in ("q", "o", "gate", "down")}) as accumulators:
        run_layer(target, hidden, inputs.layer_kwargs[layer])
    data = {
        "weights": {name: linear.weight.data.clone() for name, linear in linears.items()},
        "grams": {name: acc.gram.clone() for name, acc in accumulators.items()},
        "num_heads": adapter.num_heads,
        "num_kv_heads": adapter.num_kv_heads,
        "head_dim": adapter.head_dim,
        "source": f"SmolLM2-135M layer {layer}, Grams from {nsamples} x {seqlen} tokens "
        "of sotu-train (seed 0)",
    }
    stash.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, stash)
    return data


@torch.no_grad()
def synthetic_layer_data(
    hidden: int = 4096,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    mlp: int = 14336,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Random weights (N(0, 1/fan_in)) and random PSD Grams with log-normal channel scales
    (real activations have outlier channels), LLaMA-3-8B-shaped by default."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    def gram(size: int) -> torch.Tensor:
        factor = normal(size, size) / size**0.5
        scales = normal(size).mul(0.5).exp()
        return ((factor @ factor.T) * scales[:, None] * scales[None, :]).to(torch.float64)

    weights = {
        "q": normal(heads * head_dim, hidden) / hidden**0.5,
        "k": normal(kv_heads * head_dim, hidden) / hidden**0.5,
        "v": normal(kv_heads * head_dim, hidden) / hidden**0.5,
        "o": normal(hidden, heads * head_dim) / (heads * head_dim) ** 0.5,
        "gate": normal(mlp, hidden) / hidden**0.5,
        "up": normal(mlp, hidden) / hidden**0.5,
        "down": normal(hidden, mlp) / mlp**0.5,
    }
    grams = {"q": gram(hidden), "o": gram(heads * head_dim), "gate": gram(hidden), "down": gram(mlp)}
    return {
        "weights": weights,
        "grams": grams,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "source": f"synthetic: hidden {hidden}, {heads} heads / {kv_heads} KV heads, head_dim {head_dim}, "
        f"MLP {mlp}; random weights and random PSD Grams (seed {seed})",
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(problem: Any, settings: Any, time_limit: float | None = None) -> dict[str, Any]:
    """Train with `settings`; every accepted iterate is scored by the shared fp32 loss, with
    the time spent doing so excluded from the clocks (wall and process CPU time)."""
    from denoiserotator.method.rotation.problem import layer_loss
    from denoiserotator.method.rotation.train import train_rotation

    device = problem.weights["q"].device
    curve: list[tuple[float, float, float]] = []  # (wall seconds, CPU seconds, shared loss)
    clock = {"paused": 0.0, "paused_cpu": 0.0}

    def callback(step: int, rotation: torch.Tensor, blocks: torch.Tensor, _value: float) -> bool:
        _sync(device)
        now, now_cpu = time.perf_counter(), time.process_time()
        elapsed = now - clock["start"] - clock["paused"]
        elapsed_cpu = now_cpu - clock["start_cpu"] - clock["paused_cpu"]
        if settings.optimizer == "paper" and settings.loss_variant == "paper":
            shared = _value  # the paper recipe's own loss is the shared function itself
        else:
            with torch.no_grad():
                shared = float(layer_loss(problem, rotation.float(), blocks.float(), "paper"))
        curve.append((elapsed, elapsed_cpu, shared))
        _sync(device)
        clock["paused"] += time.perf_counter() - now
        clock["paused_cpu"] += time.process_time() - now_cpu
        return time_limit is not None and elapsed >= time_limit

    _sync(device)
    clock["start"], clock["start_cpu"] = time.perf_counter(), time.process_time()
    result = train_rotation(problem, settings, progress=False, callback=callback)
    _sync(device)
    total = time.perf_counter() - clock["start"] - clock["paused"]
    total_cpu = time.process_time() - clock["start_cpu"] - clock["paused_cpu"]
    return {
        "optimizer": result.optimizer,
        "steps": result.steps,
        "evaluations": result.evaluations,
        "stop": result.stop_reason,
        "seconds": total,
        "cpu_seconds": total_cpu,
        "seconds_per_step": total / max(result.steps, 1),
        "cpu_seconds_per_step": total_cpu / max(result.steps, 1),
        "loss_start": curve[0][2],
        "loss_best": min(loss for *_, loss in curve),
        "loss_best_internal": result.loss_best,
        "best_step": result.best_step,
        "log_line": result.log_line(),
        "curve": curve,
    }


Curve = list[tuple[float, float, float]]


def first_time_at_or_below(curve: Curve, target: float, column: int = 0) -> float | None:
    return next((row[column] for row in curve if row[2] <= target), None)


def best_within(curve: Curve, seconds: float) -> float:
    return min(loss for t, _, loss in curve if t <= seconds)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value,key=value` (values as YAML, lists in brackets) → (name,
    RotationSettings overrides)."""
    name, _, body = text.partition(":")
    return name, yaml.safe_load("{" + body.replace("=", ": ") + "}") if body else {}


def _paper_run(problem: Any, args: argparse.Namespace, key: str) -> dict[str, Any]:
    """The paper recipe on `problem`; with --reuse-paper, read from / written to the cache (for
    exploring variants; the committed reports run it in the same invocation)."""
    from denoiserotator.settings import RotationSettings

    stash = Path(args.cache) / "bench" / f"rotation_speed_paper_{key}_{args.paper_steps}.json"
    if args.reuse_paper and stash.exists():
        return json.loads(stash.read_text())
    torch.manual_seed(0)
    paper = timed_run(problem, RotationSettings(steps=args.paper_steps, optimizer="paper"))
    if args.reuse_paper:
        stash.parent.mkdir(parents=True, exist_ok=True)
        stash.write_text(json.dumps(paper))
    return paper


def compare(data: dict[str, Any], score: str, args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.method.rotation.problem import LayerProblem
    from denoiserotator.method.rotation.train import train_rotation
    from denoiserotator.settings import RotationSettings

    problem = LayerProblem.from_layer(
        data["weights"], data["grams"], score, data["num_heads"], data["num_kv_heads"], data["head_dim"]
    )
    key = hashlib.sha256(f"{data['source']}/{score}".encode()).hexdigest()[:12]
    paper = _paper_run(problem, args, key)
    print(json.dumps({data["source"]: {score: {"paper": paper["log_line"]}}}), file=sys.stderr, flush=True)
    target = paper["loss_best"]
    time_paper = first_time_at_or_below(paper["curve"], target)
    cpu_paper = first_time_at_or_below(paper["curve"], target, column=1)
    limit = paper["seconds"] * args.time_fraction if args.same_time else None
    rows: dict[str, Any] = {
        "paper": paper,
        "target_loss": target,
        "target": f"best shared-loss value of the paper recipe within {args.paper_steps} steps",
        "paper_seconds_to_target": time_paper,
        "variants": {},
    }
    for variant in args.variants:
        name, overrides = parse_variant(variant)
        settings = RotationSettings(steps=args.max_steps, optimizer="cayley").replace(**overrides)
        # Untimed: the compiled entropy kernel is built once per shape and process (seconds), as in
        # a prune job, whose 30+ layers share the shapes.
        train_rotation(problem, settings.replace(steps=2, tol=0.0), progress=False)
        torch.manual_seed(0)
        fast = timed_run(problem, settings, time_limit=limit)
        print(json.dumps({score: {name: fast["log_line"]}}), file=sys.stderr, flush=True)
        time_fast = first_time_at_or_below(fast["curve"], target)
        cpu_fast = first_time_at_or_below(fast["curve"], target, column=1)
        fast["settings"] = overrides
        rows["variants"][name] = {
            "run": fast,
            "seconds_to_target": time_fast,
            "steps_to_target": next(i for i, row in enumerate(fast["curve"]) if row[2] <= target)
            if time_fast is not None
            else None,
            "speedup_to_equal_loss": None if time_fast is None else time_paper / time_fast,
            "speedup_to_equal_loss_cpu_time": None if cpu_fast is None else cpu_paper / cpu_fast,
            "seconds_per_step_ratio_paper_over_variant": paper["seconds_per_step"] / fast["seconds_per_step"],
            "best_within_paper_time": best_within(fast["curve"], paper["seconds"]),
            "final_over_target": fast["loss_best"] / target,
        }
    for run in [paper] + [row["run"] for row in rows["variants"].values()]:
        if run.get("curve_columns"):
            continue  # a cached paper run is rounded already
        run["curve_columns"] = ["wall_seconds", "cpu_seconds", "shared_loss"]
        run["curve"] = [[round(t, 4), round(c, 4), round(loss, 3)] for t, c, loss in run["curve"]]
    return rows


def summarise(layers: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    """Per variant: the smallest speed-up over every layer and score (None: some run never reached
    its target), the layer where it occurs, and the stop reasons seen."""
    summary = {}
    for variant in variants:
        name = parse_variant(variant)[0]
        cells = [(layer, score, row["variants"][name]) for layer, scores in layers.items()
                 for score, row in scores.items()]  # fmt: skip
        speedups = [cell["speedup_to_equal_loss"] for *_, cell in cells]
        reached = [s for s in speedups if s is not None]
        worst = min(cells, key=lambda c: c[2]["speedup_to_equal_loss"] or 0.0)
        summary[name] = {
            "min_speedup_to_equal_loss": None if None in speedups else min(reached),
            "median_speedup_to_equal_loss": sorted(reached)[len(reached) // 2] if reached else None,
            "runs_not_reaching_target": len(speedups) - len(reached),
            "slowest": f"layer {worst[0]}, {worst[1]}",
            "stops": sorted({cell["run"]["stop"] for *_, cell in cells}),
            "max_final_over_target": max(cell["final_over_target"] for *_, cell in cells),
        }
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": _cpu_model(),
        "dtype": "float32 (the variants' matmul_precision aside)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": list(os.getloadavg()),
        "paper": f"optimizer 'paper': QR parametrisation, Adam lr 0.01, clip 1.0, {args.paper_steps} steps",
        "variants": {parse_variant(v)[0]: parse_variant(v)[1] for v in args.variants},
        "variant_runs": "optimizer 'cayley' with the defaults and the overrides listed, fused loss; stops "
        "by its own rule"
        + (f" or at {args.time_fraction:g} x the paper run's wall time" if args.same_time else ""),
        "layers": {},
    }
    layer_sources = {}
    for layer in ["synthetic"] if args.synthetic_llama8b else args.layers:
        if args.synthetic_llama8b:
            data = synthetic_layer_data(device=args.device)
        else:
            data = real_layer_data(args.cache, layer, args.nsamples, args.seqlen)
            data["weights"] = {name: w.to(device) for name, w in data["weights"].items()}
            data["grams"] = {name: g.to(device) for name, g in data["grams"].items()}
        layer_sources[str(layer)] = data["source"]
        report["layers"][str(layer)] = {score: compare(data, score, args) for score in args.scores}
    report["layer_sources"] = layer_sources
    report["summary"] = summarise(report["layers"], args.variants)
    report["load_average_after"] = list(os.getloadavg())
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Loss over the paper recipe's 400-step loss against wall seconds: one panel per score, every
    sampled layer a line per run (paper dashed), the target at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = sorted({score for cells in report["layers"].values() for score in cells})
    figure, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4.5), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, score in zip(axes[0], scores, strict=True):
        for cells in report["layers"].values():
            row = cells[score]
            runs = [("paper (QR, Adam, 400 steps)", row["paper"], "--", "black")]
            runs += [(name, cell["run"], "-", colours[i % len(colours)])
                     for i, (name, cell) in enumerate(row["variants"].items())]  # fmt: skip
            for label, run, style, colour in runs:
                seconds = [t for t, _, _ in run["curve"]]
                ratio = [min(loss for *_, loss in run["curve"][: i + 1]) / row["target_loss"]
                         for i in range(len(run["curve"]))]  # fmt: skip
                axis.plot(seconds, ratio, style, color=colour, linewidth=0.8, alpha=0.7, label=label)
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axis.legend(unique.values(), unique.keys(), fontsize=8)
        axis.axhline(1.0, color="grey", linewidth=0.5)
        axis.set(xscale="log", ylim=(0.95, 1.3), xlabel="wall seconds (log)")
        axis.set_title(f"{score}: every sampled layer")
        axis.set_ylabel("best loss / paper's 400-step loss")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = study_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "resources")
    parser.add_argument("--layers", type=int, nargs="+", default=[10])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--scores", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--variants", nargs="+", default=["default"],
                        help="cayley variants: name or name:key=value,... (RotationSettings overrides)")
    parser.add_argument("--paper-steps", type=int, default=400)
    parser.add_argument("--max-steps", type=int, default=2000, help="most steps of a variant")
    parser.add_argument("--same-time", action=argparse.BooleanOptionalAction, default=True,
                        help="stop a variant once it has used --time-fraction of the paper run's wall time")
    parser.add_argument("--time-fraction", type=float, default=1.0)
    parser.add_argument("--reuse-paper", action="store_true",
                        help="cache the paper runs under --cache (exploration only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--synthetic-llama8b", action="store_true",
                        help="a random LLaMA-3-8B-shaped layer instead of the real SmolLM2 ones")
    parser.add_argument("--plot", type=Path, default=None, help="also plot loss against seconds here (png)")
    args = parser.parse_args(argv)
    report = run(args)
    write_report(report, args.out, echo=False)
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
