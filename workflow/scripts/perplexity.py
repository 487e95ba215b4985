"""Perplexity of one model on one configured set (rule perplexity)."""

import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

import torch  # noqa: E402

from denoiserotator.evaluate.perplexity import main  # noqa: E402

torch.set_num_threads(snakemake.threads)  # noqa: F821
s = snakemake.params.settings  # noqa: F821
argv = [
    "--model", str(snakemake.input.model), "--dataset", s["dataset"], "--seqlen", str(s["seqlen"]),  # noqa: F821
    "--batch-size", str(s["batch_size"]), "--device", s["device"], "--out", str(snakemake.output[0]),  # noqa: F821
]  # fmt: skip
if s["max_windows"]:
    argv += ["--max-windows", str(s["max_windows"])]
main(argv)
