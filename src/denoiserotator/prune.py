"""Stage: rotate (DenoiseRotator) and/or prune one model, writing an HF folder and per-layer stats.

    python -m denoiserotator.prune --model DIR --calib calib.pt --pruner wanda --pattern 2:4 \\
        --rotation denoise --steps 100 --out results/models/... --stats stats.json
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from .data import load_calibration
from .export import load_model, measured_sparsity, save_model
from .jsonio import write_json
from .pipeline import DTYPES, PruneSettings, run_pipeline, settings_dict
from .pruners import PRUNERS
from .rotation.loss import SCORES

log = logging.getLogger(__name__)


def prune_stage(
    model_dir: Path,
    calib_path: Path,
    out_dir: Path,
    stats_path: Path,
    settings: PruneSettings,
    progress: bool = True,
) -> dict[str, Any]:
    settings.validate()
    input_ids, calib_meta = load_calibration(calib_path)
    # The model stays on CPU in the compute dtype (bf16 halves host RAM for 70B-class models);
    # one layer at a time moves to settings.device.
    model, tokenizer = load_model(model_dir, dtype=DTYPES[settings.dtype], device="cpu")
    # Outside the output folder: Snakemake removes a failed job's outputs, not this.
    checkpoint_dir = Path(out_dir).parent / f".{Path(out_dir).name}.layers"
    result = run_pipeline(model, input_ids, settings, progress=progress, checkpoint_dir=checkpoint_dir)
    sparsity = measured_sparsity(result.model)
    metadata = {
        "settings": settings_dict(settings),
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
    defaults = PruneSettings()
    parser = argparse.ArgumentParser(
        prog="python -m denoiserotator.prune",
        description="Rotate (DenoiseRotator) and/or prune a causal LM layer by layer.",
    )
    parser.add_argument("--model", type=Path, required=True, help="HF model folder")
    parser.add_argument(
        "--calib", type=Path, required=True, help="calibration token ids (from denoiserotator.calibrate)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output HF folder")
    parser.add_argument("--stats", type=Path, required=True, help="output JSON of per-layer statistics")
    parser.add_argument("--pruner", choices=(*PRUNERS, "none"), default=defaults.pruner)
    parser.add_argument(
        "--pattern", default=defaults.pattern, help='"50%%", "2:4", "4:8", ... (N:M = N zeros per M)'
    )
    parser.add_argument("--rotation", choices=("none", "denoise"), default=defaults.rotation)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="rotation steps per layer")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--clip", type=float, default=defaults.clip, help="gradient-norm clip")
    parser.add_argument(
        "--loss-variant",
        choices=("paper", "reference"),
        default=defaults.loss_variant,
        help="'reference' reproduces the reference code: SparseGPT score with λ re-added, loss in bf16",
    )
    parser.add_argument(
        "--loss-score",
        choices=SCORES,
        default=None,
        help="score of the rotation loss (default: the pruner's; wanda when --pruner none)",
    )
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=defaults.dtype)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--blocksize", type=int, default=defaults.sparsegpt_blocksize, help="SparseGPT block")
    parser.add_argument(
        "--percdamp", type=float, default=defaults.percdamp, help="SparseGPT relative damping"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = PruneSettings(
        pruner=args.pruner,
        pattern=args.pattern,
        rotation=args.rotation,
        steps=args.steps,
        lr=args.lr,
        clip=args.clip,
        loss_variant=args.loss_variant,
        loss_score=args.loss_score,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
        sparsegpt_blocksize=args.blocksize,
        percdamp=args.percdamp,
    )
    stats = prune_stage(args.model, args.calib, args.out, args.stats, settings)
    log.info("done in %.1f s, measured sparsity %.4f", stats["seconds"], stats["measured_sparsity"])


if __name__ == "__main__":
    main()
