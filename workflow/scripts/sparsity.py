"""Sparsity read back from a saved model folder (rule sparsity)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0], offline_hub=True)  # noqa: F821  (compute job)

from denoiserotator.tables import write_sparsity  # noqa: E402

write_sparsity(Path(snakemake.input.model), Path(snakemake.output[0]))  # noqa: F821
