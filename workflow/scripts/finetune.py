"""LoRA recovery fine-tuning that keeps the sparsity mask (rule finetune)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0], snakemake.threads, offline_hub=True)  # noqa: F821  (compute job)

from denoiserotator.finetune import finetune_stage  # noqa: E402
from denoiserotator.settings import ComputeSettings, FinetuneDataSettings, LoraSettings  # noqa: E402

params = snakemake.params.settings  # noqa: F821
# threads, GPU counts, evaluation batching: from the config as it is now (they change no number)
compute = ComputeSettings.for_job(params["compute"], snakemake.config["compute"])  # noqa: F821
finetune_stage(
    Path(snakemake.input.model), Path(snakemake.output.model), Path(snakemake.output.stats),  # noqa: F821
    LoraSettings.from_mapping(params["lora"]), FinetuneDataSettings.from_mapping(params["train"]),
    compute,
)  # fmt: skip
