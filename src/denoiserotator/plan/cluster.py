"""The cluster a grid runs on, stated once: its partitions and their limits.

The statement is the SLURM executor plugin's own partition file (snakemake-executor-plugin-slurm
2.8.0), named by the environment variable SNAKEMAKE_SLURM_PARTITIONS, so the plugin and this
package read the same limits, in `snakemake -n` as in the run (the plugin's
`--slurm-partition-config` is not seen by a dry run, and the workflow refuses it alone)::

    partitions:
      gpu:                                  # a GPU partition
        max_runtime: 2880                   # minutes (or "2-00:00:00")
        max_mem_mb: 1000000                 # memory of one node for a job
        max_gpu: 8                          # GPUs per node
        available_gpu_models: [a100]        # the first one is requested (--gpus=a100:N)
      cpu:                                  # max_gpu 0 (or absent): a CPU partition
        max_runtime: 1440
        max_mem_mb: 250000

A GPU's memory comes from its model name (`flops.device_for`: A100 80 GiB, "a100-40g" 40 GiB, H100
80 GiB, H200 141 GiB). Every job is routed to the first listed partition that holds it (GPU steps
to GPU partitions; CPU-only steps to CPU partitions first), its requests are capped by that
partition's limits, and a job no partition can hold is refused at planning time with the job and
the limits named (`costs.job_request`).

Without a partition file the older variables still describe one anonymous partition:
DENOISEROTATOR_MAX_RUNTIME (minutes), DENOISEROTATOR_MAX_MEM_MB and DENOISEROTATOR_GPU_MODEL, with
the partition name from SLURM_PARTITION / SBATCH_PARTITION (the profile's default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from denoiserotator.plan import flops

PARTITIONS_VARIABLE = "SNAKEMAKE_SLURM_PARTITIONS"  # the plugin reads the same variable
MAX_RUNTIME_VARIABLE = "DENOISEROTATOR_MAX_RUNTIME"  # minutes: the partition's MaxTime
MAX_MEM_VARIABLE = "DENOISEROTATOR_MAX_MEM_MB"  # MB: the memory a job may ask of one node
GPU_MODEL_VARIABLE = "DENOISEROTATOR_GPU_MODEL"  # the cluster's GPU model
DEFAULT_GPU_MODEL = "a100"


class SiteError(ValueError):
    """A partition file or limit variable that cannot be read as the site's limits."""


@dataclass(frozen=True)
class Partition:
    """One partition's limits. `name` "" is the profile's default partition; `max_gpu` None means
    unknown (the anonymous partition of the older variables: GPU jobs are sent there as before),
    0 a CPU-only partition; limits None are unlimited."""

    name: str
    max_runtime: int | None = None
    max_mem_mb: int | None = None
    max_gpu: int | None = None
    gpu_model: str = DEFAULT_GPU_MODEL

    @property
    def gpu_memory_gib(self) -> float:
        return flops.device_for(self.gpu_model).memory_gib

    @property
    def has_gpus(self) -> bool:
        return self.max_gpu is None or self.max_gpu > 0

    def describe(self) -> str:
        def limit(value: int | None, unit: str) -> str:
            return "unlimited" if value is None else f"{value} {unit}"

        gpus = "GPUs unknown" if self.max_gpu is None else f"{self.max_gpu} GPU(s)"
        if self.max_gpu:
            gpus += f" of {self.gpu_model} ({self.gpu_memory_gib:g} GiB)"
        return (f"{self.name or '(default partition)'}: {limit(self.max_runtime, 'min')}, "
                f"{limit(self.max_mem_mb, 'MB')}, {gpus}")  # fmt: skip


def _minutes(value: Any, where: str) -> int | None:
    """A partition's max_runtime in minutes, read by the plugin's own parser (numbers are minutes;
    "2-00:00:00", "12h", ...), so this package and the plugin read a file alike."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return int(value)
    try:
        # imported only for a time string: importing the plugin asks `scontrol` for the config
        from snakemake_executor_plugin_slurm.utils import parse_time_to_minutes
        from snakemake_interface_common.exceptions import WorkflowError
    except ImportError as error:
        raise SiteError(f"{where}: max_runtime {value!r}: give whole minutes, or install the "
                        "workflow extra (the SLURM plugin reads time strings)") from error  # fmt: skip
    try:
        minutes = parse_time_to_minutes(value) if isinstance(value, str) else 0
    except WorkflowError:
        minutes = 0
    if minutes <= 0:
        raise SiteError(f"{where}: max_runtime {value!r} is not a time (minutes, or D-HH:MM:SS)")
    return minutes


def _positive(value: Any, where: str, key: str, zero: bool = False) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < (0 if zero else 1):
        raise SiteError(f"{where}: {key} {value!r} must be a {'non-negative' if zero else 'positive'} number")
    return int(value)


@dataclass(frozen=True)
class Site:
    """The partitions a job may go to, in the order they were listed (the first that fits wins)."""

    partitions: tuple[Partition, ...]
    source: str

    @classmethod
    def from_file(cls, path: str | Path) -> Site:
        """The plugin's partition file. Raises SiteError (naming the file and key) when it cannot
        be read or a limit is malformed."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise SiteError(f"cannot read the partition file {path}: {error}") from error
        if not isinstance(raw, dict) or not isinstance(raw.get("partitions"), dict) or not raw["partitions"]:
            raise SiteError(f"{path}: expected a non-empty `partitions:` mapping of name → limits")
        partitions = []
        for name, limits in raw["partitions"].items():
            where = f"{path}: partitions.{name}"
            if not isinstance(limits, dict):
                raise SiteError(f"{where}: expected a mapping of limits")
            models = limits.get("available_gpu_models") or []
            if not isinstance(models, list):
                raise SiteError(f"{where}: available_gpu_models must be a list")
            max_gpu = _positive(limits.get("max_gpu", 0), where, "max_gpu", zero=True)
            partitions.append(Partition(
                name=str(name),
                max_runtime=_minutes(limits.get("max_runtime"), where),
                max_mem_mb=_positive(limits.get("max_mem_mb"), where, "max_mem_mb"),
                max_gpu=max_gpu,
                gpu_model=str(models[0]) if models else DEFAULT_GPU_MODEL,
            ))  # fmt: skip
        return cls(tuple(partitions), str(path))

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, partition_config: str | Path | None = None
    ) -> Site:
        """The site of this run: `partition_config` (the plugin's --slurm-partition-config), else
        the file in SNAKEMAKE_SLURM_PARTITIONS, else one anonymous partition from the older
        DENOISEROTATOR_MAX_RUNTIME / DENOISEROTATOR_MAX_MEM_MB / DENOISEROTATOR_GPU_MODEL variables
        (unset: unlimited). Raises SiteError on a malformed file or variable."""
        environ = os.environ if environ is None else environ
        path = partition_config or environ.get(PARTITIONS_VARIABLE, "").strip()
        if path:
            return cls.from_file(path)
        hints = {
            MAX_RUNTIME_VARIABLE: "the partition's MaxTime in whole minutes, e.g. 2880 for 2-00:00:00 "
            "(`sinfo -o '%P %l'` shows it)",
            MAX_MEM_VARIABLE: "the memory of the partition's nodes in whole MB, e.g. 250000 "
            "(`sinfo -o '%P %m'` shows it)",
        }
        limits: dict[str, int | None] = {}
        for variable, hint in hints.items():
            raw = environ.get(variable, "").strip()
            if raw and (not raw.isdigit() or int(raw) <= 0):
                raise SiteError(f"{variable}={raw!r}: give {hint}")
            limits[variable] = int(raw) if raw else None
        name = environ.get("SLURM_PARTITION", "").strip() or environ.get("SBATCH_PARTITION", "").strip()
        model = environ.get(GPU_MODEL_VARIABLE, DEFAULT_GPU_MODEL).strip()
        partition = Partition(name, limits[MAX_RUNTIME_VARIABLE], limits[MAX_MEM_VARIABLE], None, model)
        return cls((partition,), "environment")

    def candidates(self, gpus: bool) -> list[Partition]:
        """Partitions for a job, in order: GPU jobs the GPU partitions; CPU jobs the CPU
        partitions first, then the GPU ones (a site without CPU partitions runs them there)."""
        if gpus:
            return [p for p in self.partitions if p.has_gpus]
        return [p for p in self.partitions if not p.has_gpus] + [p for p in self.partitions if p.has_gpus]
