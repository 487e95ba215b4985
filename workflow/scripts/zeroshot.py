"""lm-eval zero-shot accuracy of one model (rule zeroshot)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0], snakemake.threads, offline_hub=True)  # noqa: F821  (compute job)

from denoiserotator.evaluate.zeroshot import zeroshot_stage  # noqa: E402
from denoiserotator.settings import ComputeSettings, ZeroshotSettings  # noqa: E402

params = snakemake.params.settings  # noqa: F821
# threads, GPU counts, evaluation batching: from the config as it is now (they change no number)
compute = ComputeSettings.for_job(params["compute"], snakemake.config["compute"])  # noqa: F821
zeroshot_stage(
    Path(snakemake.input.model), Path(snakemake.output[0]),  # noqa: F821
    ZeroshotSettings.from_mapping(params["settings"]), compute,
    task_dir=Path(snakemake.input.tasks),  # noqa: F821  (fixtures or the hub tasks' local copy)
)  # fmt: skip
