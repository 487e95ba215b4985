"""Perplexity of one model on one configured set (rule perplexity)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0], snakemake.threads, offline_hub=True)  # noqa: F821  (compute job)

from denoiserotator.evaluate.perplexity import perplexity_stage  # noqa: E402
from denoiserotator.settings import ComputeSettings, PerplexitySettings  # noqa: E402

params = snakemake.params.settings  # noqa: F821
# threads, GPU counts, evaluation batching: from the config as it is now (they change no number)
compute = ComputeSettings.for_job(params["compute"], snakemake.config["compute"])  # noqa: F821
perplexity_stage(
    Path(snakemake.input.model), Path(snakemake.output[0]),  # noqa: F821
    PerplexitySettings.from_mapping(params["settings"]), compute,
)  # fmt: skip
