"""Fetch or build a model's dense HF folder (rule fetch_model)."""

import logging
from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0])  # noqa: F821

from denoiserotator.files.assets import materialise_model  # noqa: E402

spec = snakemake.params.spec  # noqa: F821
out = materialise_model(spec["source"], Path(snakemake.output[0]), num_layers=spec["num_layers"])  # noqa: F821
logging.info("model ready at %s", out)
