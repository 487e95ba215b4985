"""Draw the calibration token windows once and store them with their hash.

    python -m denoiserotator.calibrate --model DIR --source json:resources/corpus/sotu-train.jsonl \
        --nsamples 128 --seqlen 2048 --seed 0 --out results/calib/x.pt

Writes ``x.pt`` (``{"input_ids", "meta"}``, read with ``denoiserotator.data.load_calibration``) and
``x.json`` (the meta, including the sha256 of the ids) next to it. Only the tokenizer is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from denoiserotator.data import calibration_ids, save_calibration
from denoiserotator.jsonio import write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample seeded calibration windows (SPEC 5.1).")
    parser.add_argument("--model", type=Path, required=True, help="model folder (its tokenizer is used)")
    parser.add_argument("--source", required=True,
                        help="c4 | c4-local:DIR | wikitext2 | wikitext2-local:DIR | json:FILE | text:FILE")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("auto", "documents", "joined"), default="auto",
                        help="documents: the paper's protocol; joined: windows of the joined corpus")
    parser.add_argument("--out", type=Path, required=True, help="output .pt (plus a .json with the meta)")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    ids, meta = calibration_ids(tokenizer, args.source, args.nsamples, args.seqlen, args.seed,
                                mode=args.mode, with_meta=True)
    meta["model"] = str(args.model)
    meta = save_calibration(args.out, ids, meta)
    write_json(args.out.with_suffix(".json"), meta)


if __name__ == "__main__":
    main()
