"""Sparsity read back from a saved model folder (rule sparsity)."""

import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821

from denoiserotator.tables import write_sparsity  # noqa: E402

write_sparsity(Path(snakemake.input.model), Path(snakemake.output[0]))  # noqa: F821
