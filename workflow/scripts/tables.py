"""Collect every row's results into main.csv/.parquet/.md and the plots (rule tables)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0])  # noqa: F821

from denoiserotator.tables import build_tables, write_json_atomic  # noqa: E402

out = snakemake.output  # noqa: F821
write_json_atomic(Path(out.manifest), snakemake.params.manifest)  # noqa: F821
build_tables(
    Path(out.manifest),
    csv=Path(out.csv),
    parquet=Path(out.parquet),
    markdown=Path(out.markdown),
    ppl_plot=Path(out.ppl_plot),
    entropy_plot=Path(out.entropy_plot),
    zeroshot_plot=Path(out.zeroshot_plot),
)
