"""Collect every row's results into main.csv/.parquet/.md and the plots (rule tables)."""

import logging
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

from denoiserotator.tables import build_tables, write_json_atomic  # noqa: E402

out = snakemake.output  # noqa: F821
write_json_atomic(Path(out.manifest), snakemake.params.manifest)  # noqa: F821
build_tables(
    Path(out.manifest), csv=Path(out.csv), parquet=Path(out.parquet), markdown=Path(out.markdown),
    ppl_plot=Path(out.ppl_plot), entropy_plot=Path(out.entropy_plot),
)
