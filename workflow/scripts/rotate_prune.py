"""DenoiseRotator and/or pruning of one grid cell."""

from pathlib import Path

from denoiserotator.locations import job_log, model_folder
from denoiserotator.pipeline import PruneSettings
from denoiserotator.prune import prune_stage

snakemake = snakemake  # noqa: F821  (injected by Snakemake)

with job_log(snakemake.log[0], threads=snakemake.threads):
    prune_stage(
        model_folder(snakemake.input.model),
        Path(snakemake.input.calib),
        Path(snakemake.output.model),
        Path(snakemake.output.stats),
        PruneSettings(**snakemake.params.settings),
        progress=False,
    )
