"""LoRA recovery fine-tuning that keeps the sparsity mask (rule finetune)."""

import sys

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

import torch  # noqa: E402

from denoiserotator.finetune import main  # noqa: E402

torch.set_num_threads(snakemake.threads)  # noqa: F821
s = snakemake.params.settings  # noqa: F821
argv = [
    "--model", str(snakemake.input.model), "--train", s["source"],  # noqa: F821
    "--out", str(snakemake.output.model), "--stats", str(snakemake.output.stats),  # noqa: F821
    "--steps", str(s["steps"]), "--batch-size", str(s["batch_size"]), "--seqlen", str(s["seqlen"]),
    "--n-sequences", str(s["n_sequences"]), "--lr", str(s["lr"]), "--weight-decay", str(s["weight_decay"]),
    "--warmup-steps", str(s["warmup_steps"]), "--r", str(s["r"]), "--alpha", str(s["alpha"]),
    "--dropout", str(s["dropout"]), "--seed", str(s["seed"]), "--dtype", s["dtype"], "--device", s["device"],
    "--target-modules", *s["target_modules"],
]  # fmt: skip
if s["micro_batch_size"]:
    argv += ["--micro-batch-size", str(s["micro_batch_size"])]
main(argv)
