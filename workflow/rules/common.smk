# Validation and the rules' input functions (get_*; no lambdas in rules). The grid, names and ids live in
# denoiserotator.plan.experiment, the requests in denoiserotator.plan.costs (tested without Snakemake).

import os

from snakemake.utils import validate

from denoiserotator.plan import costs, jobs as plan
from denoiserotator.plan.cluster import Partition, Site
from denoiserotator.plan.experiment import ROW_RE, VARIANT_RE, Experiment, Row

validate(config, schema="../schemas/config.schema.yaml")
EXP = Experiment(config)
RES = EXP.resources_dir


def get_final_targets() -> list:
    return [f"results/tables/main.{ext}" for ext in ("csv", "parquet", "md")] + [
        "results/tables/ppl.png", "results/tables/entropy.png", "results/tables/zeroshot.png"]


def get_fetch_params(wildcards) -> dict:
    return EXP.models[wildcards.model].model_dump(include={"source", "num_layers"})


def get_calib_inputs(wildcards) -> dict:
    return {"model": EXP.base_model_dir(wildcards.model), "corpus": EXP.corpus_inputs(EXP.calibration.source)}


def get_calib_params(wildcards) -> dict:
    return {**EXP.calibration.to_dict(), "source": EXP.resolve_source(EXP.calibration.source)}


def get_prune_inputs(wildcards) -> dict:
    return {"model": EXP.base_model_dir(wildcards.model), "calib": f"results/calib/{wildcards.model}/{wildcards.calib}.pt"}


def get_prune_params(wildcards) -> dict:
    return EXP.prune_params(wildcards.model, wildcards.calib, wildcards.variant)


def _lora_row(wildcards) -> Row:
    return EXP.row_for(f"{wildcards.model}/{wildcards.calib}/{wildcards.variant}/lora-{wildcards.ft}")


def get_finetune_inputs(wildcards) -> dict:
    row = _lora_row(wildcards)
    return {"model": f"{row.prune_dir}/hf", "corpus": EXP.corpus_inputs(EXP.finetune_data.source)}


def get_finetune_params(wildcards) -> dict:
    _lora_row(wildcards)  # refuses ids of other settings
    return {"lora": EXP.lora.to_dict(), "compute": EXP.compute_for(wildcards.model).result_fields(),
            "train": {**EXP.finetune_data.to_dict(), "source": EXP.resolve_source(EXP.finetune_data.source)}}


def get_eval_model(wildcards) -> str:
    return EXP.row_model_dir(Row.from_path(wildcards.row))


def get_ppl_inputs(wildcards) -> dict:
    if wildcards.set not in EXP.perplexity or wildcards.pplid != EXP.ppl_id(wildcards.set):
        raise ValueError(f"ppl-{wildcards.set}-{wildcards.pplid} does not match the configured sets")
    return {"model": get_eval_model(wildcards), "corpus": EXP.corpus_inputs(EXP.perplexity[wildcards.set].dataset)}


def get_ppl_params(wildcards) -> dict:
    return EXP.ppl_params(wildcards.set, wildcards.row)


def get_zeroshot_inputs(wildcards) -> dict:
    if wildcards.zsid != EXP.zeroshot_id():
        raise ValueError(f"zeroshot-{wildcards.zsid} does not match the configured tasks ({EXP.zeroshot_id()})")
    return {"model": get_eval_model(wildcards), "tasks": EXP.zeroshot_task_dir()}


def get_zeroshot_params(wildcards) -> dict:
    return EXP.zeroshot_params(wildcards.row)


def get_fetch_targets(wildcards) -> list:
    return EXP.fetch_targets()


def get_table_inputs(wildcards) -> list:
    return EXP.table_inputs()


def get_table_manifest(wildcards) -> dict:
    return EXP.manifest()


# resources: denoiserotator.plan.costs, per rule step
def _model_of(wildcards) -> str:
    return wildcards.model if hasattr(wildcards, "model") else wildcards.row.split("/", 1)[0]


def get_threads(step: str):
    return lambda wildcards: costs.threads(EXP, _model_of(wildcards), step)


def _rotated(wildcards) -> bool:
    # a rotated row's folder also holds fp32 boundary matrices (costs.loaded_bytes)
    if hasattr(wildcards, "row"):
        return Row.from_path(wildcards.row).rotation == "denoise"
    return hasattr(wildcards, "variant") and not wildcards.variant.endswith("_none")


def _site():
    # SNAKEMAKE_SLURM_PARTITIONS (the plugin reads it too), else the older variables; a file given only
    # as --slurm-partition-config is not seen by `snakemake -n` (another executor): refused.
    config_file = getattr(getattr(workflow, "executor_settings", None), "partition_config", None)
    site = Site.from_environment()
    if config_file and site.source != str(config_file):
        raise ValueError(f"--slurm-partition-config {config_file}: export SNAKEMAKE_SLURM_PARTITIONS="
                         f"{config_file} instead, so that planning and the run read the same partitions")
    return site


def _retries() -> int:
    # --retries / the profile's restart-times (Snakemake 9 keeps it in the execution settings)
    return getattr(getattr(workflow, "execution_settings", None), "retries", 0) or 0


# the prune rule's own retries: its resuming attempts plus one for other failures (plan.prune_retries)
PRUNE_RETRIES = plan.prune_retries(EXP, _site(), _retries())


def _request(step: str, wildcards, attempt: int) -> dict:
    variant = getattr(wildcards, "variant", None) if step == "prune" else None
    args = (EXP, _model_of(wildcards), step, _rotated(wildcards), variant, attempt, _site())
    if workflow.is_main_process:  # planning: refuse what fits no partition, retries included
        retries = PRUNE_RETRIES if step == "prune" and attempt == 1 else None
        return costs.job_request(*args, retries=retries).resources(os.environ)
    # a spawned job re-evaluates them with `--retries 0 --attempt 1`: no check (the plan allowed it)
    try:
        return costs.job_request(*args).resources(os.environ)
    except costs.ResourceLimitError:
        return {"slurm_partition": "", "mem_mb": 0, "runtime": 0, "gpu": 0, "gpu_model": "", "gres": ""}


def get_local_mem_mb(step: str):
    # local rules run on the submit host: no partition, no site limit
    return lambda wildcards, attempt: costs.mem_mb(EXP, _model_of(wildcards), step, attempt, Partition(""))


def get_resource(step: str, key: str):
    # every resource of a job from one costs.job_request: partition, mem_mb, runtime, GPU flags
    return lambda wildcards, attempt: _request(step, wildcards, attempt)[key]
