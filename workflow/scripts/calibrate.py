"""Calibration token ids with their sha256 (rule calibrate)."""

import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from denoiserotator.calibrate import main  # noqa: E402

s = snakemake.params.settings  # noqa: F821
# writes the .pt atomically and the .json sidecar (meta incl. sha256) next to it
main([
    "--model", str(snakemake.input.model),  # noqa: F821
    "--source", s["source"], "--nsamples", str(s["nsamples"]), "--seqlen", str(s["seqlen"]),
    "--seed", str(s["seed"]), "--mode", s["mode"],
    "--out", str(snakemake.output.ids),  # noqa: F821
])  # fmt: skip
