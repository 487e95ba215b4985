"""Draw the calibration token windows once and store them with their hash.

    python -m denoiserotator.calibrate --model DIR --source json:resources/corpus/sotu-train.jsonl \
        --nsamples 128 --seqlen 2048 --seed 0 --out results/calib/x.pt

Writes ``x.pt`` (``{"input_ids", "meta"}``, read with ``denoiserotator.files.text.load_calibration``) and
``x.json`` (the meta, including the sha256 of the ids) next to it. Only the tokenizer is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from denoiserotator.files.jsonio import write_json
from denoiserotator.files.text import calibration_ids, save_calibration
from denoiserotator.settings import CalibrationSettings


def calibrate_stage(model_dir: Path, out: Path, settings: CalibrationSettings) -> dict[str, Any]:
    """Draw the calibration windows (SPEC §5.1) with the tokenizer of `model_dir`; write `out`
    (.pt) and its .json meta (with the sha256 of the ids); returns the meta."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids, meta = calibration_ids(tokenizer, settings.source, settings.nsamples, settings.seqlen, settings.seed,
                                mode=settings.mode, with_meta=True)  # fmt: skip
    meta["model"] = str(model_dir)
    meta = save_calibration(out, ids, meta)
    write_json(out.with_suffix(".json"), meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample seeded calibration windows (SPEC 5.1).")
    parser.add_argument("--model", type=Path, required=True, help="model folder (its tokenizer is used)")
    parser.add_argument("--out", type=Path, required=True, help="output .pt (plus a .json with the meta)")
    CalibrationSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    calibrate_stage(args.model, args.out, CalibrationSettings.from_namespace(args))


if __name__ == "__main__":
    main()
