"""Rotate (DenoiseRotator) and/or prune one model (rule prune)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0], snakemake.threads, offline_hub=True)  # noqa: F821  (compute job)

from denoiserotator.method.sequential import PruneSettings  # noqa: E402
from denoiserotator.prune import prune_stage  # noqa: E402
from denoiserotator.settings import ComputeSettings  # noqa: E402

params = snakemake.params.settings  # noqa: F821
# threads, GPU counts, checkpoint cadence: from the config as it is now (they change no layer)
compute = ComputeSettings.for_job(params["compute"], snakemake.config["compute"])  # noqa: F821
prune_stage(
    Path(snakemake.input.model), Path(snakemake.input.calib),  # noqa: F821
    Path(snakemake.output.model), Path(snakemake.output.stats),  # noqa: F821
    PruneSettings.from_params({**params, "compute": compute.to_dict()}), progress=False,
)  # fmt: skip
