"""Download a hub dataset's local copy (rule fetch_dataset; needs internet, runs locally)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0])  # noqa: F821

from denoiserotator.files.assets import fetch_dataset  # noqa: E402

folder = fetch_dataset(snakemake.wildcards.dataset, Path(snakemake.output[0]))  # noqa: F821
print(f"{snakemake.wildcards.dataset} ready at {folder}")  # noqa: F821
