"""Zero-shot accuracy with lm-eval (0-shot), on the hub tasks or on local substitute fixtures.

The paper reports acc_norm for PIQA, HellaSwag, ARC-e and ARC-c, acc for WinoGrande, and the
unweighted mean of the five. With ``task_dir`` (made by ``denoiserotator.files.assets
build_zeroshot_fixtures``) the tasks ``local_<task>`` are run instead: lm-eval's own prompts and
metrics over local items built from held-out text. Those numbers are substitutes, labelled so.

Each task carries lm-eval's standard error of its metric (``<metric>_stderr``: the per-item
scores' sample standard deviation over sqrt(n)); the average carries sqrt(Σ se_i²)/k
(``denoiserotator.evaluate.uncertainty.mean_stderr``: the tasks' items are disjoint, so independent).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from denoiserotator.evaluate.uncertainty import mean_stderr
from denoiserotator.files.assets import COMPLETE_MARKER, HUB_TASKS_KIND, LOCAL_TASK_PREFIX
from denoiserotator.files.jsonio import write_json
from denoiserotator.files.text import FETCH_RULE, MissingAssetError, hub_offline, missing
from denoiserotator.settings import DTYPES, ComputeSettings, ZeroshotSettings
from denoiserotator.settings import ZEROSHOT_TASKS as TASKS

METRICS: dict[str, str] = {
    "piqa": "acc_norm",
    "winogrande": "acc",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
}


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def zeroshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str] | tuple[str, ...] = TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    task_dir: Path | None = None,
    device: str = "cpu",
    log_samples: bool = False,
    fetch_rule: str = "zeroshot_fixtures",
) -> dict[str, Any]:
    """Run lm-eval 0-shot on ``tasks`` and return the paper's metric per task and their mean.

    Per task: ``value`` (fraction 0-1) and ``stderr`` (lm-eval's standard error of it, None when
    lm-eval gives none, e.g. for a single item); ``zeroshot_avg`` with ``zeroshot_avg_stderr``
    (sqrt(Σ se_i²)/k, None when any task's is missing).

    ``task_dir``: ``local_<task>`` YAMLs, either substitute fixtures (``build_zeroshot_fixtures``)
    or the hub tasks' local copy (``fetch_dataset("lm-eval")``, labelled "hub (local copy)");
    a missing YAML raises MissingAssetError naming it and ``fetch_rule``. Without ``task_dir``
    lm-eval reads the hub, which raises MissingAssetError when the hub is offline.

    ``log_samples=True`` adds lm-eval's per-item records under ``"samples"`` (for checks).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in METRICS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
    if task_dir is not None:
        task_dir = Path(task_dir).resolve()
        names = {t: LOCAL_TASK_PREFIX + t for t in tasks}
        absent = [task_dir / f"{n}.yaml" for n in names.values() if not (task_dir / f"{n}.yaml").is_file()]
        if absent:
            raise missing(absent[0], fetch_rule)
        _check_includes(task_dir, list(names.values()))
        manager = TaskManager(include_path=str(task_dir))
        marker = task_dir / COMPLETE_MARKER
        kind = json.loads(marker.read_text()).get("kind") if marker.is_file() else None
        task_source = "hub (local copy)" if kind == HUB_TASKS_KIND else "local fixtures (substitute items)"
    else:
        if hub_offline():
            raise MissingAssetError(
                "the hub zero-shot tasks need the hub, which is offline here: pass "
                f"the local copy made by the {FETCH_RULE} rule (lm-eval) as task_dir"
            )
        task_source = "hub"
        names = {t: t for t in tasks}
        manager = TaskManager()
    # A loaded model: HFLM uses it where it is (one device, or split by accelerate over several;
    # its `device` argument only applies to models it loads itself).
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=[names[t] for t in tasks],
        num_fewshot=0,
        limit=limit,
        batch_size=batch_size,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=1000,
    )
    if output is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results")
    results: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        name, metric = names[task], METRICS[task]
        row = output["results"][name]
        n_samples = output.get("n-samples", {}).get(name, {})
        results["tasks"][task] = {
            "lm_eval_task": name,
            "metric": metric,
            "value": float(row[f"{metric},none"]),
            "stderr": _finite(row.get(f"{metric}_stderr,none")),
            "version": output["versions"].get(name),
            "n": n_samples.get("effective"),
        }
    values = [results["tasks"][t]["value"] for t in tasks]
    results.update(
        zeroshot_avg=float(sum(values) / len(values)),
        zeroshot_avg_stderr=mean_stderr([results["tasks"][t]["stderr"] for t in tasks]),
        lm_eval_version=lm_eval.__version__ if hasattr(lm_eval, "__version__") else _package_version(),
        num_fewshot=0,
        limit=limit,
        batch_size=batch_size,
        task_source=task_source,
        task_dir=str(task_dir) if task_dir is not None else None,
    )
    if log_samples:
        results["samples"] = {task: output["samples"][names[task]] for task in tasks}
    return results


def placement(weights: float, device: str, gpu_bytes: list[int], reserve: float) -> dict[int, int] | None:
    """Where the model goes: None = whole on `device`; else accelerate's max_memory {GPU: bytes}.

    weights: bytes of the tensors as loaded (`export.folder_loaded_bytes`); gpu_bytes: total memory
    of each visible GPU (SLURM makes the GPUs a job got visible); reserve: bytes each GPU keeps for
    activations (costs.EVAL_GPU_RESERVE_GIB, the same rule that sized the job's GPU request). The
    model is split over every visible GPU only when it does not fit the one `device` names.
    Raises RuntimeError before anything is loaded when the visible GPUs together are too small.
    """
    if not device.startswith("cuda") or not gpu_bytes:
        return None
    budgets = {index: int(total - reserve) for index, total in enumerate(gpu_bytes)}
    first = int(device.split(":", 1)[1]) if ":" in device else 0
    if weights <= budgets[first]:
        return None
    if weights > sum(budgets.values()):
        raise RuntimeError(
            f"the weights ({weights / 2**30:.1f} GiB) do not fit the {len(gpu_bytes)} visible GPU(s) "
            f"({sum(budgets.values()) / 2**30:.1f} GiB after a reserve of {reserve / 2**30:.1f} GiB each); "
            "request more GPUs (the model entry's resources: {zeroshot: {gpu: N}})"
        )
    return budgets


def _gpu_memory(device: str) -> list[int]:
    if not device.startswith("cuda"):
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def _check_includes(task_dir: Path, names: list[str]) -> None:
    """The YAMLs name lm-eval's files and the data by absolute path: fail clearly if they moved."""
    import yaml

    for name in names:
        config = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        paths = [config["include"], *config["dataset_kwargs"]["data_files"].values()]
        stale = [p for p in paths if not Path(p).is_file()]
        if stale:
            raise FileNotFoundError(
                f"{task_dir / name}.yaml points at missing {stale}; rebuild them with "
                "`python -m denoiserotator.files.assets zeroshot-fixtures` on this machine"
            )


def _package_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def zeroshot_stage(
    model_dir: Path,
    out: Path,
    settings: ZeroshotSettings,
    compute: ComputeSettings,
    task_dir: Path | None = None,
) -> dict[str, Any]:
    """lm-eval zero-shot of the model folder `model_dir` (in `compute.dtype`); with `task_dir`,
    the local task YAMLs (fixtures, or the hub tasks' local copy) instead of the hub. Writes the
    result JSON `out` and returns it.

    On CUDA a model that does not fit one GPU is split over all visible GPUs by accelerate
    (`placement`; device_map="auto" with max_memory, whole decoder layers per GPU) and handed to
    lm-eval's HFLM as a loaded model, so the strict loading and the package's Rotated* classes
    apply as on one device. RuntimeError when the visible GPUs are too small together.
    """
    from denoiserotator.files import export
    from denoiserotator.plan import costs

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    torch.manual_seed(0)
    device = compute.resolved_device()
    dtype = DTYPES[compute.dtype]
    weights = export.folder_loaded_bytes(model_dir, dtype)  # boundaries stay fp32 in bf16
    max_memory = placement(weights, device, _gpu_memory(device), costs.EVAL_GPU_RESERVE_GIB * 2**30)
    model, tokenizer = export.load_model(model_dir, dtype=dtype, device=device, max_memory=max_memory)
    fetch_rule = FETCH_RULE if settings.source == "hub" else "zeroshot_fixtures"
    result = zeroshot(model, tokenizer, list(settings.tasks), limit=settings.limit,
                      batch_size=settings.batch_size, task_dir=task_dir, device=device,
                      fetch_rule=fetch_rule)  # fmt: skip
    result.update(model=str(model_dir), dtype=compute.dtype,
                  gpus=len(max_memory) if max_memory else int(device.startswith("cuda")))  # fmt: skip
    write_json(out, result)
    print(json.dumps({t: round(r["value"], 4) for t, r in result["tasks"].items()}
                     | {"zeroshot_avg": round(result["zeroshot_avg"], 4),
                        "zeroshot_avg_stderr": result["zeroshot_avg_stderr"]}), file=sys.stderr)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Zero-shot accuracy with lm-eval (0-shot).")
    parser.add_argument("--model", type=Path, required=True, help="model folder (HF format)")
    parser.add_argument("--task-dir", type=Path, default=None,
                        help="local fixtures from `python -m denoiserotator.files.assets zeroshot-fixtures` "
                             "(default: the hub tasks)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    ZeroshotSettings.add_arguments(parser, only=("tasks", "limit", "batch_size"))
    ComputeSettings.add_arguments(parser, only=("device", "dtype"))
    args = parser.parse_args(argv)
    settings, compute = ZeroshotSettings.from_namespace(args), ComputeSettings.from_namespace(args)
    zeroshot_stage(args.model, args.out, settings, compute, task_dir=args.task_dir)


if __name__ == "__main__":
    main()
