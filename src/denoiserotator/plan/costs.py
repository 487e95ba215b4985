"""What each rule asks the cluster for: host memory, time, GPUs and threads, from the model's size.

The stages keep the whole model on the host in its dtype (4 bytes per parameter in float32, 2
in bfloat16) and move one decoder layer at a time to the GPU; the prune stage also holds the
calibration activations (three copies of nsamples × seqlen × hidden, hidden ≤ 8192). The prune
step's time is the counted work of the job (`denoiserotator.plan.flops.prune_job`: Gram collections,
rotation training, SparseGPT, propagation) on the GPU model the SLURM profile asks for
(DENOISEROTATOR_GPU_MODEL, default a100; the CPU row of `flops.DEVICES` without a GPU), with a
COMPUTE_MARGIN× margin, on top of the fixed allowance for loading and saving; this needs the
model entry's shape fields (hidden, layers, intermediate, heads, kv_heads). Without them, rotation
time falls back to the paper's 0.124 s per step per layer on an A100 for an 8B model, scaled
linearly with size, with a 1.5× margin. A model entry's `resources` block overrides any value per
step; every value doubles with each retry (`attempt`).

Requests never exceed the limits of the partition a job goes to (`job_request`, with the site
of `denoiserotator.plan.cluster`: the plugin's partition file, or DENOISEROTATOR_MAX_RUNTIME and
DENOISEROTATOR_MAX_MEM_MB for one partition): sbatch would refuse such a job, or leave it pending
for ever. A retry asks for at most the limit (a prune job retried after its time limit needs no
more memory than before). A prune job longer than the time limit runs as several attempts at the
limit, each resuming after the last layer checkpoint (`prune_attempts`); any other first request
above every partition's limits is refused at planning time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from denoiserotator.method.pruners import parse_pattern
from denoiserotator.plan import flops
from denoiserotator.plan.cluster import (  # noqa: F401  (re-exported: the limit variables)
    DEFAULT_GPU_MODEL,
    GPU_MODEL_VARIABLE,
    MAX_MEM_VARIABLE,
    MAX_RUNTIME_VARIABLE,
    PARTITIONS_VARIABLE,
    Partition,
    Site,
    SiteError,
)
from denoiserotator.plan.experiment import Experiment, variant_parts

# Host memory per parameter-GB of the model, by stage: what each holds besides the weights.
# sparsity: 0, the read-back streams one tensor at a time (export.folder_sparsity), so 3 GB suffice.
MEMORY_FACTOR: dict[str, float] = {"prune": 1.3, "finetune": 2.5, "sparsity": 0.0}
# Steps whose needs do not scale with the model (first attempt; × attempt on a retry). calibrate:
# the tokenizer and the corpus's documents as text (C4's first train shard: ≈ 0.8 GB), the
# token lists of the sampled documents only (`data.calibration_ids`).
FIXED_MEM_MB: dict[str, int] = {"calibrate": 4000}
FIXED_RUNTIME_MINUTES: dict[str, int] = {"calibrate": 60, "sparsity": 30}
DEFAULT_MEMORY_FACTOR = 1.2
SECONDS_PER_STEP_LAYER_8B = 0.124  # paper, A100, LLaMA-3-8B (32 layers); fallback without shapes
COMPUTE_MARGIN = 1.5  # on the modelled compute time: achievable rates are assumptions (flops.DEVICES)
CPU_SLOWDOWN = 20  # CPU-only runs: generous, so that a cluster never kills them
RESUMABLE_STEPS = frozenset({"prune"})  # resume after their last layer checkpoint when rerun


class ResourceLimitError(ValueError):
    """A job's request cannot fit the site's limits (`denoiserotator.plan.cluster`), or a limit is
    malformed."""


def _partition(partition: Partition | None) -> Partition:
    """`partition`, else the one anonymous partition of the limit variables."""
    if partition is not None:
        return partition
    try:
        environ = {k: v for k, v in os.environ.items() if k != PARTITIONS_VARIABLE}
        return Site.from_environment(environ).partitions[0]
    except SiteError as error:
        raise ResourceLimitError(str(error)) from error


def max_runtime(partition: Partition | None = None) -> int | None:
    """The partition's time limit in minutes (default: DENOISEROTATOR_MAX_RUNTIME); None when
    unlimited. Raises ResourceLimitError on a malformed variable."""
    return _partition(partition).max_runtime


def max_mem_mb(partition: Partition | None = None) -> int | None:
    """The most memory one job may ask of the partition, in MB (default: DENOISEROTATOR_MAX_MEM_MB);
    None when unlimited. Raises ResourceLimitError on a malformed variable."""
    return _partition(partition).max_mem_mb


def _within_limit(request: int, limit: int | None, attempt: int, resumable: bool, refusal: str) -> int:
    """`request`, at most `limit`: a resumable job and any retry ask for the limit instead; the
    first attempt of another job above it raises ResourceLimitError(`refusal`)."""
    if limit is None or request <= limit:
        return request
    if resumable or attempt > 1:
        return limit
    raise ResourceLimitError(refusal)


def _override(exp: Experiment, model: str, step: str, key: str) -> Any:
    return exp.models[model].resource(step, key)


def uses_gpu(exp: Experiment) -> bool:
    return exp.compute.device.startswith("cuda") or exp.compute.gpus > 0


def threads(exp: Experiment, model: str, step: str) -> int:
    return _override(exp, model, step, "threads") or exp.compute.threads


def gpus(
    exp: Experiment, model: str, step: str, rotated: bool = False, gpu_gib: float | None = None
) -> int:
    """GPUs of a rule step: the entry's override, else `compute.gpus`, raised for the steps that hold
    the whole model on GPUs (`whole_model_on_gpu`) to `gpus_for_weights` of what the row's folder
    loads (`loaded_bytes`: a `rotated` row adds its fp32 boundary matrices) on GPUs of `gpu_gib`
    GiB (default GPU_MEMORY_GIB); 0 for CPU-only configs."""
    value = _override(exp, model, step, "gpu")
    if value is not None:
        return value
    if exp.compute.gpus == 0 or not whole_model_on_gpu(exp, step):
        return exp.compute.gpus
    memory = GPU_MEMORY_GIB if gpu_gib is None else gpu_gib
    return max(exp.compute.gpus, gpus_for_weights(loaded_bytes(exp, model, rotated), memory))


def mem_mb(
    exp: Experiment, model: str, step: str, attempt: int = 1, partition: Partition | None = None
) -> int:
    """Host memory in MB: weights × the stage's factor + calibration activations (prune) + 3 GB,
    × attempt, at most the partition's max_mem_mb (default: DENOISEROTATOR_MAX_MEM_MB). Raises
    ResourceLimitError when the first attempt's request is above that limit."""
    request = _uncapped_mem_mb(exp, model, step) * attempt
    limit = max_mem_mb(partition)
    refusal = (
        f"the {step} job of {model} needs about {request} MB of host memory, more than a node's "
        f"{limit} MB: use a partition with larger nodes, hold the model in "
        f"bfloat16 (the entry's `dtype`), or set a `resources: {{{step}: {{mem_mb: ...}}}}` "
        f"override for {model} if the estimate is too high"
    )
    return _within_limit(request, limit, attempt, resumable=False, refusal=refusal)


def _uncapped_mem_mb(exp: Experiment, model: str, step: str) -> int:
    value = _override(exp, model, step, "mem_mb") or FIXED_MEM_MB.get(step)
    if value:
        return int(value)
    entry = exp.models[model]
    weights_gb = entry.params_b * (4.0 if exp.model_dtype(model) == "float32" else 2.0)
    calib = exp.calibration
    activations_gb = calib.nsamples * calib.seqlen * 8192 * 4 * 3 / 1e9 if step == "prune" else 0.0
    factor = MEMORY_FACTOR.get(step, DEFAULT_MEMORY_FACTOR)
    return int(1024 * (weights_gb * factor + min(activations_gb, 64.0) + 3.0))


def runtime(
    exp: Experiment,
    model: str,
    step: str,
    rotated: bool = False,
    attempt: int = 1,
    variant: str | None = None,
    partition: Partition | None = None,
) -> int:
    """Minutes: 20 + 6 per billion parameters (loading, saving), plus the prune job's modelled
    compute (`prune_seconds` × COMPUTE_MARGIN; when the model entry has no shape fields: the
    paper's rotation time for rotated rows) or LoRA steps (finetune); × CPU_SLOWDOWN without a GPU
    (on the fixed part; the modelled part uses the CPU's rate). `variant`: the prune job's folder
    name (pruner, pattern), e.g. "sparsegpt_2-4_dr-1a2b3c4d"; without it SparseGPT, unstructured
    (the most expensive) is assumed. At most the partition's max_runtime (default:
    DENOISEROTATOR_MAX_RUNTIME): a longer prune job asks for the limit (it resumes,
    `prune_attempts`); other steps raise ResourceLimitError when their first attempt does not fit.
    The partition's GPU model sets the modelled compute rate."""
    request = _uncapped_runtime(exp, model, step, rotated, variant, partition) * attempt
    limit = max_runtime(partition)
    refusal = (
        f"the {step} job of {model} needs about {request} min, more than the partition's "
        f"{limit} min, and cannot resume after a time-out: "
        + ("lower lora.steps, " if step == "finetune" else "")
        + f"set a `resources: {{{step}: {{runtime: ...}}}}` override for {model} if the estimate "
        "is too high, or use a partition with a longer limit"
    )
    return _within_limit(request, limit, attempt, step in RESUMABLE_STEPS, refusal)


def check_prune_retries(
    exp: Experiment,
    model: str,
    rotated: bool,
    variant: str | None,
    retries: int | None,
    partition: Partition | None = None,
) -> int:
    """The prune job's attempts at the partition's limit (`prune_attempts`); raises
    ResourceLimitError when they are more than Snakemake's `retries` (the profile's
    restart-times; None: not checked) allow, so that the plan fails now instead of the job after
    days on the cluster."""
    attempts = prune_attempts(exp, model, rotated, variant, partition=partition)
    if retries is not None and attempts > retries + 1:
        limit = max_runtime(partition)
        raise ResourceLimitError(
            f"the prune job of {model} ({variant}) needs about "
            f"{_uncapped_runtime(exp, model, 'prune', rotated, variant, partition)} min: {attempts} "
            f"attempts of {limit} min (the partition's limit), each resuming after its last layer "
            "checkpoint, "
            f"but Snakemake retries a job only {retries} time(s): add `--retries {attempts - 1}` "
            "(the slurm profile's restart-times), use a partition with a longer limit, or lower "
            "rotation.steps"
        )
    return attempts


def _fixed_minutes(exp: Experiment, model: str) -> float:
    """Loading and saving: 20 + 6 per billion parameters (× CPU_SLOWDOWN without a GPU)."""
    minutes = 20 + 6 * exp.models[model].params_b
    return minutes if uses_gpu(exp) else minutes * CPU_SLOWDOWN


def _uncapped_runtime(
    exp: Experiment,
    model: str,
    step: str,
    rotated: bool,
    variant: str | None,
    partition: Partition | None = None,
) -> int:
    value = _override(exp, model, step, "runtime") or FIXED_RUNTIME_MINUTES.get(step)
    if value:
        return int(value)
    size = exp.models[model].params_b
    minutes = _fixed_minutes(exp, model)
    shape = flops.LayerShape.from_entry(exp.models[model])
    gpu_model = partition.gpu_model if partition is not None else None
    if step == "prune" and shape is not None:
        minutes += COMPUTE_MARGIN * prune_seconds(exp, model, rotated, variant, gpu_model) / 60
    elif step == "prune" and rotated:
        fallback = 1.5 * exp.rotation.steps * SECONDS_PER_STEP_LAYER_8B * 32 * (size / 8.0) / 60
        minutes += fallback * (1 if uses_gpu(exp) else CPU_SLOWDOWN)
    elif step == "zeroshot":
        minutes += COMPUTE_MARGIN * zeroshot_seconds(exp, model, gpu_model) / 60
    elif step == "finetune" and shape is not None:
        minutes += COMPUTE_MARGIN * finetune_seconds(exp, model, gpu_model) / 60
    elif step == "finetune":
        minutes += 10 * size * exp.lora.steps / 1024 * (1 if uses_gpu(exp) else CPU_SLOWDOWN)
    return int(minutes)


def prune_attempts(
    exp: Experiment,
    model: str,
    rotated: bool,
    variant: str | None,
    limit: int | None = None,
    partition: Partition | None = None,
) -> int:
    """How many attempts of at most `limit` minutes (default: DENOISEROTATOR_MAX_RUNTIME) the prune
    job needs, each resuming after the last layer checkpoint. Every attempt pays the fixed loading
    and saving time again and can lose the work since the last checkpoint: at most
    `compute.checkpoint_every_layers` layers, or `compute.checkpoint_every_minutes` plus one layer.
    1 without a limit. Raises ResourceLimitError when an attempt of `limit` minutes cannot finish a
    single layer."""
    limit = max_runtime(partition) if limit is None else limit
    total = _uncapped_runtime(exp, model, "prune", rotated, variant, partition)
    if limit is None or total <= limit:
        return 1
    fixed = _fixed_minutes(exp, model)
    compute = total - fixed
    shape = flops.LayerShape.from_entry(exp.models[model])
    # without a shape: the fetch's layer count, else LLaMA-3-8B's 32
    layers = shape.layers if shape is not None else exp.models[model].num_layers
    per_layer = compute / layers
    settings = exp.compute_for(model)
    lost = min(settings.checkpoint_every_layers * per_layer, settings.checkpoint_every_minutes + per_layer)
    progress = limit - fixed - lost
    if progress < per_layer:
        raise ResourceLimitError(
            f"the prune job of {model} needs about {total} min; an attempt of {limit} min "
            f"(the partition's limit) spends {fixed:.0f} min loading and saving and may lose "
            f"{lost:.0f} min since its last checkpoint, leaving less than one layer ({per_layer:.0f} min): "
            "use a partition with a longer limit, or lower rotation.steps"
        )
    return math.ceil(compute / progress)


def compute_device(exp: Experiment, gpu_model: str | None = None) -> flops.Device:
    """The `flops.DEVICES` entry jobs run on: `gpu_model` (default: DENOISEROTATOR_GPU_MODEL;
    unknown or unset: A100), or the CPU."""
    if not uses_gpu(exp):
        return flops.DEVICES["cpu"]
    name = gpu_model or os.environ.get(GPU_MODEL_VARIABLE, DEFAULT_GPU_MODEL) or DEFAULT_GPU_MODEL
    return flops.device_for(name)


def _pruner_and_nm(variant: str | None) -> tuple[str, int | None, float, str]:
    """(pruner, M of an N:M pattern, sparsity, refinement) of a prune job's folder name."""
    if variant is None:
        return "sparsegpt", None, 0.5, "none"
    pruner, name, _, refine = variant_parts(variant)
    if pruner == "none":
        return "none", None, 0.0, "none"
    pattern = parse_pattern(name)
    nm = None if pattern.kind != "nm" else int(pattern.m)  # type: ignore[arg-type]
    return pruner, nm, pattern.sparsity, refine


def prune_work(exp: Experiment, model: str, rotated: bool, variant: str | None = None) -> flops.Work:
    """Counted work of one prune job (`flops.prune_job`) from the config. Raises ValueError when
    the model entry has no shape fields."""
    shape = flops.LayerShape.from_entry(exp.models[model])
    if shape is None:
        raise ValueError(f"model {model!r} has no shape fields ({', '.join(flops.LayerShape.FIELDS)})")
    pruner, nm, sparsity, refine = _pruner_and_nm(variant)
    calib = exp.calibration
    return flops.prune_job(
        shape,
        tokens=calib.nsamples * calib.seqlen,
        seqlen=calib.seqlen,
        pruner=pruner,
        rotation_score=exp.rotation.score_for(pruner) if rotated else None,
        steps=exp.rotation.steps,
        learn_r2=exp.rotation.learn_r2,
        variant=exp.rotation.loss_variant,
        blocksize=exp.pruning.sparsegpt_blocksize,
        nm=nm,
        compute=flops.precision_of(exp.model_dtype(model)),
        gram="fp32" if uses_gpu(exp) else "fp64",
        matmul="tf32" if uses_gpu(exp) and exp.rotation.matmul_precision == "high" else "fp32",
        optimizer=exp.rotation.optimizer,
        refine=refine,
        sparsity=sparsity,
        max_swaps=exp.refinement.max_swaps,
        candidates=exp.refinement.candidates,
    )


# What lm-eval scores per task on the hub datasets: (items, answer choices, tokens of context and
# continuation per choice). Items are the split sizes lm-eval evaluates (PIQA and HellaSwag
# validation, WinoGrande-XL dev, ARC test); tokens are rounded up from the tasks' typical lengths
# (HellaSwag's context plus ending ≈ 85). An estimate: every choice is one forward, no padding.
ZEROSHOT_REQUESTS: dict[str, tuple[int, int, int]] = {
    "piqa": (1838, 2, 50),
    "winogrande": (1267, 2, 30),
    "hellaswag": (10042, 4, 85),
    "arc_easy": (2376, 4, 40),
    "arc_challenge": (1172, 4, 45),
}


def zeroshot_tokens(exp: Experiment) -> int:
    """Tokens lm-eval scores for one row: per task, items (at most `limit`; the local fixtures'
    `fixture_items`) × choices × tokens per choice (`ZEROSHOT_REQUESTS`)."""
    settings = exp.zeroshot
    total = 0
    for task in settings.tasks:
        items, choices, tokens = ZEROSHOT_REQUESTS[task]
        if settings.source == "local":
            items = settings.fixture_items
        if settings.limit is not None:
            items = min(items, settings.limit)
        total += items * choices * tokens
    return total


def zeroshot_seconds(exp: Experiment, model: str, gpu_model: str | None = None) -> float:
    """Modelled seconds of one row's zero-shot evaluation (no margin): 2 · parameters per token
    scored (`flops.zeroshot_forward`) in the model's dtype on `compute_device`."""
    precision = flops.precision_of(exp.model_dtype(model))
    work = flops.zeroshot_forward(exp.models[model].params_b * 1e9, zeroshot_tokens(exp), precision)
    return flops.seconds(work, compute_device(exp, gpu_model))


def finetune_seconds(exp: Experiment, model: str, gpu_model: str | None = None) -> float:
    """Modelled seconds of LoRA training (no margin): per step, batch_size × seqlen tokens forward
    (`flops.perplexity_forward`: the layers plus the head), backward twice that (activation
    gradients through the frozen linears, attention, the adapters), and one more forward with
    `lora.gradient_checkpointing`; in the model's dtype on `compute_device`."""
    shape = _shape_with_vocab(exp, model)
    if shape is None:
        raise ValueError(f"model {model!r} has no shape fields ({', '.join(flops.LayerShape.FIELDS)})")
    lora, data = exp.lora, exp.finetune_data
    tokens = lora.batch_size * data.seqlen
    precision = flops.precision_of(exp.model_dtype(model))
    forward = flops.perplexity_forward(shape, tokens, data.seqlen, precision)
    passes = 3 + (1 if lora.gradient_checkpointing else 0)
    return flops.seconds(forward * (passes * lora.steps), compute_device(exp, gpu_model))


def prune_seconds(
    exp: Experiment, model: str, rotated: bool, variant: str | None = None, gpu_model: str | None = None
) -> float:
    """Modelled seconds of one prune job's compute on `compute_device` (no margin)."""
    work = prune_work(exp, model, rotated, variant)
    return flops.seconds(work, compute_device(exp, gpu_model), threads(exp, model, "prune"))


# ----------------------------------------------------------------------------------------------
# how a GPU request reaches sbatch (snakemake-executor-plugin-slurm 2.8.0, utils.set_gres_string):
#   gpu_model set -> --gpus=<model>:<gpu>  (even when gpu is 0: "--gpus=a100:0")
#   gpu > 0 only  -> --gpus=<gpu>
#   gres set      -> --gres=<gres>         (and a "gpu" resource would add --gpus as well)
# So the model and the gres string are only set when the job really asks for GPUs, and the gres
# route leaves the gpu count at 0. The GPU model and the route are properties of the cluster:
# they come from the environment (profiles/slurm/profile.yaml documents them).

GPU_FLAG_ENV = "DENOISEROTATOR_GPU_FLAG"
GPU_FLAGS = ("gpus", "gres")


def gpu_request(count: int, environ: Mapping[str, str], gpu_model: str | None = None) -> dict[str, Any]:
    """The `gpu`, `gpu_model` and `gres` resources of a job that needs `count` GPUs.

    `environ`: DENOISEROTATOR_GPU_MODEL (unset: "a100"; "" for untyped GPUs) and
    DENOISEROTATOR_GPU_FLAG ("gpus", the default: `--gpus=<model>:<n>`; "gres":
    `--gres=gpu:<model>:<n>` for clusters whose SelectType rejects `--gpus`). With `count` 0
    every value is empty, so sbatch gets no GPU flag at all. `gpu_model`: the partition's (from
    the site's partition file) instead of the variable. Raises ValueError for another flag.
    """
    flag = environ.get(GPU_FLAG_ENV, "").strip() or "gpus"
    if flag not in GPU_FLAGS:
        raise ValueError(f"{GPU_FLAG_ENV} must be one of {GPU_FLAGS}, not {flag!r}")
    model = environ.get(GPU_MODEL_VARIABLE, DEFAULT_GPU_MODEL).strip() if gpu_model is None else gpu_model
    if count <= 0:
        return {"gpu": 0, "gpu_model": "", "gres": ""}
    if flag == "gres":
        return {"gpu": 0, "gpu_model": "", "gres": f"gpu:{model}:{count}" if model else f"gpu:{count}"}
    return {"gpu": count, "gpu_model": model, "gres": ""}


LORA_GPU_OVERHEAD_GIB = 2.0  # CUDA context, allocator slack and the optimizer step's temporaries


def _shape_with_vocab(exp: Experiment, model: str) -> flops.LayerShape | None:
    """The entry's shape with the vocabulary recovered from params_b (embedding and head: the
    parameters the decoder linears leave)."""
    shape = flops.LayerShape.from_entry(exp.models[model])
    if shape is None:
        return None
    rest = exp.models[model].params_b * 1e9 - shape.layers * shape.layer_params
    return dataclasses.replace(shape, vocab=max(0, int(rest / (2 * shape.hidden))))


def lora_gpu_bytes(
    shape: flops.LayerShape,
    loaded: float,
    lora: Any,
    seqlen: int,
    itemsize: int,
    checkpointing: bool,
) -> float:
    """GPU memory of LoRA training on one GPU: `loaded` bytes of the folder's tensors, the adapters
    with their gradients and AdamW state (`flops.lora_parameters` × 16 B), one micro-batch's
    activations (`flops.lora_activation_bytes`, measured by bench/lora_memory.py) and
    LORA_GPU_OVERHEAD_GIB. `lora`: the LoraSettings (r, batch_size, micro_batch_size)."""
    tokens = (lora.micro_batch_size or lora.batch_size) * seqlen
    adapters = flops.lora_parameters(shape, lora.r) * flops.LORA_ADAPTER_BYTES_PER_PARAMETER
    activations = flops.lora_activation_bytes(shape, tokens, itemsize, checkpointing)
    return loaded + adapters + activations + LORA_GPU_OVERHEAD_GIB * 2**30


def finetune_gpu_bytes(exp: Experiment, model: str, rotated: bool, checkpointing: bool) -> float | None:
    """`lora_gpu_bytes` of a row of the grid (`loaded_bytes`); None without the entry's shape."""
    shape = _shape_with_vocab(exp, model)
    if shape is None:
        return None
    itemsize = BYTES_PER_PARAMETER[exp.model_dtype(model)]
    return lora_gpu_bytes(shape, loaded_bytes(exp, model, rotated), exp.lora, exp.finetune_data.seqlen,
                          itemsize, checkpointing)  # fmt: skip


def prune_gpu_bytes(exp: Experiment, model: str) -> float | None:
    """Estimated GPU peak of the prune job, which holds one decoder layer at a time: the rotation
    training's (`flops.rotation_memory_bytes`, SparseGPT score, the largest) plus the fp64 Gram
    and its inverse for the widest input (down_proj). None without the entry's shape fields.
    An estimate (docs/cluster.md: ≈ 40–45 GB at 70B); bench/gpu_check.py measures it."""
    shape = flops.LayerShape.from_entry(exp.models[model])
    if shape is None:
        return None
    widest = max(columns for _, columns in shape.linears().values())
    return flops.rotation_memory_bytes(shape, "sparsegpt") + 2 * 8 * widest**2


# -- a job on the site ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRequest:
    """What one job asks of the site: its partition, GPUs, host memory (MB) and time (minutes) for
    this attempt, and how many attempts at the partition's limit it needs (prune jobs resume)."""

    step: str
    model: str
    partition: Partition
    gpus: int
    mem_mb: int
    runtime: int
    attempts: int = 1

    def resources(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """The rule's resources: slurm_partition, mem_mb, runtime and the GPU flags (`gpu_request`)."""
        gpu_model = None if self.partition.max_gpu is None else self.partition.gpu_model
        return {"slurm_partition": self.partition.name, "mem_mb": self.mem_mb, "runtime": self.runtime,
                **gpu_request(self.gpus, environ, gpu_model)}  # fmt: skip


def job_request(
    exp: Experiment,
    model: str,
    step: str,
    rotated: bool = False,
    variant: str | None = None,
    attempt: int = 1,
    site: Site | None = None,
    retries: int | None = None,
) -> JobRequest:
    """Route one job to the first partition of `site` (default: `Site.from_environment()`) that
    holds it, GPU jobs to GPU partitions, CPU-only jobs to CPU partitions first (`Site.candidates`),
    with requests capped by that partition (`gpus`, `mem_mb`, `runtime`, `prune_attempts`).

    `retries` (Snakemake's --retries): when given, a prune job needing more resuming attempts than
    that does not fit the partition. Raises ResourceLimitError naming the job and, per partition,
    why it does not fit, when none does.
    """
    site = Site.from_environment() if site is None else site
    wants_gpus = step in GPU_STEPS and gpus(exp, model, step, rotated) > 0
    resumable = step in RESUMABLE_STEPS
    reasons = []
    for partition in site.candidates(wants_gpus):
        try:
            count = gpus(exp, model, step, rotated, partition.gpu_memory_gib) if wants_gpus else 0
            if partition.max_gpu is not None and count > partition.max_gpu:
                memory_gib, most = partition.gpu_memory_gib, partition.max_gpu
                raise ResourceLimitError(f"needs {count} GPU(s) of {memory_gib:g} GiB, more than its {most}")
            layer = prune_gpu_bytes(exp, model) if step == "prune" and count > 0 else None
            if layer is not None and layer > partition.gpu_memory_gib * 2**30:
                raise ResourceLimitError(
                    f"one decoder layer's rotation and pruning need ≈ {layer / 2**30:.0f} GiB of GPU "
                    f"memory, more than one {partition.gpu_model} ({partition.gpu_memory_gib:g} GiB)"
                )
            lora = finetune_gpu_bytes(exp, model, rotated, True) if step == "finetune" and count > 0 else None
            if lora is not None and lora > partition.gpu_memory_gib * 2**30:
                raise ResourceLimitError(
                    f"LoRA fine-tuning holds the whole model on one GPU and needs ≈ {lora / 2**30:.0f} "
                    f"GiB even with gradient checkpointing, more than one {partition.gpu_model} "
                    f"({partition.gpu_memory_gib:g} GiB); multi-GPU LoRA is not implemented: leave "
                    f"{model} out of finetune.rows"
                )
            memory = mem_mb(exp, model, step, attempt, partition)
            minutes = runtime(exp, model, step, rotated, attempt, variant, partition)
            attempts = 1
            if resumable:
                attempts = check_prune_retries(exp, model, rotated, variant, retries, partition)
        except ResourceLimitError as error:
            reasons.append(f"{partition.describe()}: {error}")
            continue
        return JobRequest(step, model, partition, count, memory, minutes, attempts)
    job = f"the {step} job of {model}" + (f" ({variant})" if variant else "")
    raise ResourceLimitError(
        f"{job} fits no partition of the site ({site.source}): " + "; ".join(reasons)
        if reasons else f"{job}: the site ({site.source}) has no {'GPU ' if wants_gpus else ''}partition"
    )


# -- GPUs for evaluation -------------------------------------------------------------------------
# Zero-shot (and perplexity with compute.eval_mode: whole) holds the whole model on GPUs, split by
# accelerate (device_map="auto") when it does not fit one. Each GPU keeps a fixed reserve for what
# does not scale with the weights: the logits of a batch (8 × ≤ 512 tokens × 152k vocab in fp32 ≈
# 2.5 GB, twice with the log-softmax), the CUDA context and allocator slack. The zero-shot stage
# splits with the same reserve (evaluate.zeroshot.placement).
GPU_MEMORY_GIB = 80.0  # one A100-80G, the GPU the cluster profile asks for
EVAL_GPU_RESERVE_GIB = 8.0
BYTES_PER_PARAMETER: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


def weights_bytes(exp: Experiment, model: str) -> float:
    """Bytes of the model's weights in its dtype (params_b × 10⁹ × bytes per parameter)."""
    return exp.models[model].params_b * 1e9 * BYTES_PER_PARAMETER[exp.model_dtype(model)]


def boundary_bytes(exp: Experiment, model: str) -> float:
    """Bytes of a rotated folder's boundary matrices Q_{i-1}ᵀQ_i, one hidden × hidden matrix per
    layer after the first, kept in fp32 in any model dtype (`export.loaded_itemsize`): 21 GB at
    LLaMA-3-70B, 15 % of its bf16 weights. Without the entry's shape fields: params_b × 10⁹ / 3
    bytes (a LLaMA-type decoder has ≈ 12 · layers · hidden² parameters)."""
    shape = flops.LayerShape.from_entry(exp.models[model])
    if shape is None:
        return exp.models[model].params_b * 1e9 / 3
    return (shape.layers - 1) * shape.hidden**2 * 4


def loaded_bytes(exp: Experiment, model: str, rotated: bool) -> float:
    """Bytes a row's saved folder takes on GPUs once loaded: `weights_bytes`, plus
    `boundary_bytes` for a rotated row (what `export.folder_loaded_bytes` reads from the files)."""
    return weights_bytes(exp, model) + (boundary_bytes(exp, model) if rotated else 0.0)


def gpus_for_weights(weights: float, gpu_gib: float = GPU_MEMORY_GIB) -> int:
    """The fewest GPUs of `gpu_gib` GiB whose memory less `EVAL_GPU_RESERVE_GIB` each holds `weights`
    bytes (at least 1)."""
    return max(1, math.ceil(weights / ((gpu_gib - EVAL_GPU_RESERVE_GIB) * 2**30)))


def whole_model_on_gpu(exp: Experiment, step: str) -> bool:
    """Whether a step holds the whole model on GPUs: zero-shot (lm-eval), and perplexity unless it
    runs layer by layer (compute.eval_mode auto/layerwise on CUDA: one decoder layer at a time)."""
    if step == "zeroshot":
        return True
    return step == "perplexity" and exp.compute.resolved_eval_mode(exp.compute.device) == "whole"


# -- the cluster guide's table (docs/cluster.md) -----------------------------------------------
TABLE_STEPS: tuple[str, ...] = ("prune", "finetune", "perplexity", "zeroshot", "sparsity")
GPU_STEPS: tuple[str, ...] = ("prune", "finetune", "perplexity", "zeroshot")  # rules with gpu=get_gpu(..)


def resource_table(exp: Experiment) -> str:
    """Markdown: per model its size, dtype, weights, and per step the host memory and GPUs its rule
    requests (first attempt; GPUs of a rotated row, the larger), from `mem_mb` and `gpus`, the
    functions the rules call."""
    header = ["model", "parameters", "dtype", "weights"] + [
        f"{step}: host RAM / GPUs" for step in TABLE_STEPS
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, entry in exp.models.items():
        cells = [
            model,
            f"{entry.params_b:g} B",
            exp.model_dtype(model),
            f"{weights_bytes(exp, model) / 1e9:.0f} GB",
        ]
        cells += [
            f"{mem_mb(exp, model, step) / 1024:.0f} GB / "
            + (str(gpus(exp, model, step, rotated=True)) if step in GPU_STEPS else "-")
            for step in TABLE_STEPS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_experiment(config: str) -> Experiment:
    """The Experiment of a config file (without overlays); absent keys take the settings' defaults."""
    import yaml

    with open(config) as handle:
        return Experiment(yaml.safe_load(handle))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Resource requests of the rules.")
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="Markdown table of host memory and GPUs per model and step")
    table.add_argument("--config", default="config/config.yaml")
    args = parser.parse_args(argv)
    print(resource_table(load_experiment(args.config)), end="")


if __name__ == "__main__":
    main()
