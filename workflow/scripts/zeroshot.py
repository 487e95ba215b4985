"""lm-eval zero-shot accuracy of one model (rule zeroshot)."""

import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

import torch  # noqa: E402

from denoiserotator.evaluate.zeroshot import main  # noqa: E402

torch.set_num_threads(snakemake.threads)  # noqa: F821
s = snakemake.params.settings  # noqa: F821
argv = [
    "--model", str(snakemake.input.model), "--tasks", s["tasks"], "--batch-size", str(s["batch_size"]),  # noqa: F821
    "--device", s["device"], "--out", str(snakemake.output[0]),  # noqa: F821
]  # fmt: skip
if s["limit"]:
    argv += ["--limit", str(s["limit"])]
if "fixtures" in snakemake.input.keys():  # noqa: F821
    argv += ["--task-dir", str(snakemake.input.fixtures)]  # noqa: F821
main(argv)
