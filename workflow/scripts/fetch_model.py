"""Fetch or build a model's dense HF folder (rule fetch_model)."""

import logging
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

from denoiserotator.assets import materialise_model  # noqa: E402

spec = snakemake.params.spec  # noqa: F821
out = materialise_model(spec["source"], Path(snakemake.output[0]), num_layers=spec["num_layers"])  # noqa: F821
logging.info("model ready at %s", out)
