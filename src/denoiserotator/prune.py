"""Stage: rotate (DenoiseRotator) and/or prune one model, writing an HF folder and per-layer stats.

    python -m denoiserotator.prune --model DIR --calib calib.pt --pruner wanda --pattern 2:4 \\
        --rotation denoise --steps 100 --out results/models/... --stats stats.json

The rotation, pruning and compute options are generated from the settings classes
(`denoiserotator.settings`); `--help` lists them with their defaults.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from denoiserotator.files.export import load_model, measured_sparsity, save_model
from denoiserotator.files.jsonio import write_json
from denoiserotator.files.text import load_calibration
from denoiserotator.method.checks import check_settings
from denoiserotator.method.pruners import PRUNERS
from denoiserotator.method.pruners.refine import REFINE_METHODS
from denoiserotator.method.sequential import PruneSettings, run_pipeline
from denoiserotator.preemption import handle_signals
from denoiserotator.settings import (
    DTYPES,
    ComputeSettings,
    PruningSettings,
    RefinementSettings,
    RotationSettings,
)

log = logging.getLogger(__name__)


def prune_stage(
    model_dir: Path,
    calib_path: Path,
    out_dir: Path,
    stats_path: Path,
    settings: PruneSettings,
    progress: bool = True,
) -> dict[str, Any]:
    """Rotate and/or prune the HF folder `model_dir` with the calibration ids at `calib_path`;
    write the result folder `out_dir` (loads with `export.load_model`) and `stats_path` (settings,
    per-layer records, measured sparsity). Nothing is written if the pipeline fails. On SIGTERM or
    SIGUSR1 the finished layers are checkpointed and `preemption.Preempted` is raised."""
    settings.validate()
    check_settings(settings)  # before anything is loaded: e.g. a GPU requested where there is none
    input_ids, calib_meta = load_calibration(calib_path)
    # The model stays on CPU in the compute dtype (bf16 halves host RAM for 70B-class models);
    # one layer at a time moves to the compute device.
    model, tokenizer = load_model(model_dir, dtype=DTYPES[settings.compute.dtype], device="cpu")
    # Outside the output folder: Snakemake removes a failed job's outputs, not this.
    checkpoint_dir = Path(out_dir).parent / f".{Path(out_dir).name}.layers"
    # SLURM's SIGTERM before the time limit (the profile's --signal) checkpoints and stops the job
    # (preemption.Preempted), so the retry resumes after the layers finished so far.
    with handle_signals():
        result = run_pipeline(model, input_ids, settings, progress=progress, checkpoint_dir=checkpoint_dir)
    sparsity = measured_sparsity(result.model)
    metadata = {
        "settings": settings.to_dict(),
        "source_model": str(model_dir),
        "calibration": {"path": str(calib_path), **{k: v for k, v in calib_meta.items() if k != "input_ids"}},
        "untied_embeddings": result.untied_embeddings,
    }
    # Saved in the compute dtype; the eval stages cast as configured.
    save_model(result.model, tokenizer, Path(out_dir), boundary=result.boundary, metadata=metadata)
    stats = {
        **metadata,
        "layers": result.layer_stats,
        "measured_sparsity": sparsity["overall"],
        "measured_sparsity_per_linear": sparsity.get("per_linear", {}),
        "seconds": result.seconds,
    }
    write_json(Path(stats_path), stats)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m denoiserotator.prune",
        description="Rotate (DenoiseRotator) and/or prune a causal LM layer by layer (SPEC §5).",
    )
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument(
        "--calib", type=Path, required=True, help="calibration token ids (from denoiserotator.calibrate)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output HF folder")
    parser.add_argument("--stats", type=Path, required=True, help="output JSON of per-layer statistics")
    parser.add_argument("--pruner", choices=(*PRUNERS, "none"), default="wanda")
    parser.add_argument("--pattern", default="50%", help='"50%%", "2:4", "4:8", ... (N:M = N zeros per M)')
    parser.add_argument("--rotation", choices=("none", "denoise"), default="denoise")
    parser.add_argument(
        "--refine", choices=REFINE_METHODS, default="none", help="refinement after pruning (pruners.refine)"
    )
    RotationSettings.add_arguments(parser)
    PruningSettings.add_arguments(parser)
    RefinementSettings.add_arguments(parser)
    ComputeSettings.add_arguments(
        parser,
        only=("device", "dtype", "prune_batch_size", "checkpoint_every_layers", "checkpoint_every_minutes"),
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> PruneSettings:
    return PruneSettings(
        pruner=args.pruner,
        pattern=None if args.pruner == "none" else args.pattern,
        rotation=RotationSettings.from_namespace(args) if args.rotation == "denoise" else None,
        pruning=PruningSettings.from_namespace(args),
        compute=ComputeSettings.from_namespace(args),
        refine=args.refine,
        refinement=RefinementSettings.from_namespace(args),
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stats = prune_stage(args.model, args.calib, args.out, args.stats, settings_from_args(args))
    log.info("done in %.1f s, measured sparsity %.4f", stats["seconds"], stats["measured_sparsity"])


if __name__ == "__main__":
    main()
