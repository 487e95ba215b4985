"""Saving and loading model folders (the one place that writes and reads them).

A saved folder is a regular Hugging Face model folder (safetensors, config, tokenizer) plus
`denoiserotator.json` (metadata). When the model carries merged boundary rotations
(SPEC §2, last bullet), the folder also holds `modeling_denoiserotator.py` and its config
names the Rotated* class in `architectures` and `auto_map`, so stock tools load it with
`trust_remote_code=True`; without rotations it is a plain folder any tool loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from denoiserotator.files import modeling_denoiserotator as modeling
from denoiserotator.files.modeling_denoiserotator import attach_boundary_rotations, get_boundary_rotations
from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter

METADATA_FILE = "denoiserotator.json"
MODELING_FILE = "modeling_denoiserotator.py"
FORMAT_VERSION = 1

__all__ = [
    "METADATA_FILE",
    "attach_boundary_rotations",
    "get_boundary_rotations",
    "folder_loaded_bytes",
    "folder_parameter_count",
    "gpu_device_map",
    "folder_sparsity",
    "load_model",
    "measured_sparsity",
    "read_metadata",
    "save_model",
    "unwrap_model",
]


class LoadingError(RuntimeError):
    """A folder's weights do not match the model they are loaded into."""


def unwrap_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _base_weight(linear: nn.Module) -> torch.Tensor:
    # peft replaces a Linear by a wrapper whose frozen original sits in `base_layer`.
    return getattr(linear, "base_layer", linear).weight


def measured_sparsity(model: nn.Module) -> dict[str, Any]:
    """Fraction of exact zeros in the seven decoder linears, overall and per linear kind.

    For a peft-wrapped model the base weights are read (unmerged adapters do not count).
    """
    adapter = get_adapter(unwrap_model(model))
    zeros = dict.fromkeys(LINEAR_NAMES, 0)
    totals = dict.fromkeys(LINEAR_NAMES, 0)
    for index in range(adapter.num_layers):
        layer = adapter.layer(index)
        for name in LINEAR_NAMES:
            weight = _base_weight(layer.linear(name)).detach()
            zeros[name] += int((weight == 0).sum())
            totals[name] += weight.numel()
    return {
        "overall": sum(zeros.values()) / sum(totals.values()),
        "per_linear": {name: zeros[name] / totals[name] for name in LINEAR_NAMES},
        "zeros": sum(zeros.values()),
        "total": sum(totals.values()),
    }


def _safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors shards (from the index when sharded); FileNotFoundError if none."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{folder} has no model.safetensors(.index.json)")


def folder_parameter_count(folder: str | Path) -> int:
    """Values stored in a folder's safetensors, read from the file headers only (no tensor data)."""
    from safetensors import safe_open

    count = 0
    for path in _safetensors_files(Path(folder)):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                count += math.prod(handle.get_slice(key).get_shape())
    return count


_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
                      "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip


def loaded_itemsize(name: str, stored: str, dtype: torch.dtype) -> int:
    """Bytes per value of the tensor `name` (safetensors dtype `stored`) once loaded with `dtype`:
    floating tensors take `dtype`, except the boundary rotations, which half-precision loading
    keeps in fp32 (`DenoiseRotatorBoundaryMixin._keep_in_fp32_modules_strict`); integer tensors
    keep their own type."""
    if not stored.startswith(("F", "BF")):
        return _SAFETENSORS_BYTES.get(stored, 1)  # the 8-bit types
    if modeling.BOUNDARY_ATTR in name.split(".") and dtype in (torch.float16, torch.bfloat16):
        return 4
    return dtype.itemsize


def folder_loaded_bytes(folder: str | Path, dtype: torch.dtype) -> int:
    """Bytes the folder's tensors take on the device once loaded with `dtype` (`loaded_itemsize`),
    from the safetensors headers only. A rotated 70B folder in bf16: 141 GB of weights plus 79
    boundary matrices of 8192² in fp32 (21 GB). FileNotFoundError without safetensors."""
    from safetensors import safe_open

    total = 0
    for path in _safetensors_files(Path(folder)):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                total += math.prod(tensor.get_shape()) * loaded_itemsize(key, tensor.get_dtype(), dtype)
    return total


def _model_class_of(folder: Path, config: dict[str, Any]) -> type[PreTrainedModel] | None:
    """The package's Rotated* class a folder with boundary rotations loads with; None for a plain
    folder (AutoModelForCausalLM). LoadingError for a rotated folder of an unknown architecture."""
    if not config.get(modeling.CONFIG_KEY):
        return None
    name = (config.get("architectures") or [""])[0]
    model_class = getattr(modeling, name, None)
    if model_class is None or not getattr(model_class, "_denoiserotator_rotated", False):
        raise LoadingError(f"{folder}: boundary rotations recorded but unknown architecture {name!r}")
    return model_class


def gpu_device_map(
    folder: str | Path, dtype: torch.dtype, max_memory: dict[int | str, int]
) -> dict[str, int | str]:
    """Accelerate's device map for the folder's model over the devices of `max_memory` ({GPU index
    or "cpu": bytes}), planned on a meta model as `from_pretrained(device_map="auto")` plans it
    (balanced memory, whole decoder layers), with every tensor in the dtype it loads in (the
    Rotated* classes keep the boundaries fp32).

    Raises RuntimeError, before any weight is read, when the plan puts a module anywhere else
    ("disk", or "cpu" when not given): offloaded layers run for days instead of hours, and the
    job's GPU request was meant to hold the whole model.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    raw = json.loads((folder / "config.json").read_text())
    model_class = _model_class_of(folder, raw)
    with init_empty_weights():
        if model_class is None:
            meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            meta = model_class._from_config(config, dtype=dtype)
    # the Rotated* classes build their boundaries in fp32 for half dtypes, as loading keeps them
    no_split = meta._no_split_modules
    budgets = get_balanced_memory(meta, max_memory=dict(max_memory), no_split_module_classes=no_split)
    device_map = infer_auto_device_map(meta, max_memory=budgets, no_split_module_classes=no_split)
    offloaded = sorted(name for name, device in device_map.items() if device not in max_memory)
    if offloaded:
        need = folder_loaded_bytes(folder, dtype)
        raise RuntimeError(
            f"{folder}: {len(offloaded)} module(s) would not fit the {len(max_memory)} device(s) and go to "
            f"{sorted({str(device_map[n]) for n in offloaded})} ({', '.join(offloaded[:4])}"
            f"{', ...' if len(offloaded) > 4 else ''}); the model needs {need / 2**30:.1f} GiB in "
            f"{str(dtype).removeprefix('torch.')}, the GPUs hold {sum(max_memory.values()) / 2**30:.1f} GiB "
            "after the reserve: request more GPUs (the model entry's resources: {zeroshot: {gpu: N}})"
        )
    return device_map


def folder_sparsity(folder: str | Path) -> dict[str, Any]:
    """`measured_sparsity` of a saved folder, streamed: no model is built.

    Reads the seven decoder linears' weights (`<layers>.<i>.<linear path>.weight`, paths from the
    family's adapter chosen by config.json) one tensor at a time with `safetensors.safe_open`, so
    host memory holds one weight matrix (down_proj of a 70B model: 235 M values) instead of the
    model. Raises FileNotFoundError without safetensors and LoadingError when a layer's linear is
    missing from the files.
    """
    from types import SimpleNamespace

    from safetensors import safe_open

    from denoiserotator.method.adapters import adapter_class_for_config, linear_rows

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    adapter = adapter_class_for_config(SimpleNamespace(**config))
    num_layers = int(config["num_hidden_layers"])
    # A fused linear (Phi-3's qkv_proj) is stored as one tensor: its rows are counted per block.
    rows = linear_rows(SimpleNamespace(**config))
    wanted = {
        f"{adapter.layers_path}.{index}.{path}.weight": names
        for index in range(num_layers)
        for path, names in adapter.stored_linears().items()
    }
    zeros = dict.fromkeys(LINEAR_NAMES, 0)
    totals = dict.fromkeys(LINEAR_NAMES, 0)
    seen: set[str] = set()
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                names = wanted.get(key)
                if names is None or key in seen:
                    continue
                weight = handle.get_tensor(key)
                for name, block in zip(names, weight.split([rows[name] for name in names]), strict=True):
                    zeros[name] += int((block == 0).sum())
                    totals[name] += block.numel()
                seen.add(key)
    missing = sorted(set(wanted) - seen)
    if missing:
        raise LoadingError(
            f"{folder}: {len(missing)} decoder linears missing from the files, e.g. {missing[:3]}"
        )
    return {
        "overall": sum(zeros.values()) / sum(totals.values()),
        "per_linear": {name: zeros[name] / totals[name] for name in LINEAR_NAMES},
        "zeros": sum(zeros.values()),
        "total": sum(totals.values()),
    }


def _untie_config_if_untied(model: PreTrainedModel) -> None:
    """A config that still says 'tied' would make transformers re-tie lm_head on load."""
    if getattr(model.config, "tie_word_embeddings", False) and not get_adapter(model).tied_embeddings:
        model.config.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys = {}


def _patch_config(folder: Path, model: PreTrainedModel, boundary_layers: list[int]) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if boundary_layers:
        name = modeling.rotated_class_for(model).__name__
        config["architectures"] = [name]
        config["auto_map"] = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{name}"}
        config[modeling.CONFIG_KEY] = boundary_layers
    else:
        config["architectures"] = [modeling.plain_class(model).__name__]
        config.pop("auto_map", None)
        config.pop(modeling.CONFIG_KEY, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _replace_folder(tmp: Path, folder: Path) -> None:
    # os.replace cannot overwrite a non-empty directory: move the old one aside first.
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    folder: str | Path,
    boundary: list[torch.Tensor | None] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write `model` (and tokenizer) as a loadable folder, atomically.

    boundary: merged boundary rotations to attach before saving (attached to `model` in place,
    replacing any it carries); None keeps whatever the model already carries. A peft-wrapped
    model is refused: merge the adapters first (finetune.lora_finetune does).
    """
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        raise TypeError("save_model got a peft-wrapped model; merge the adapters first")
    folder = Path(folder)
    if boundary is not None:
        attach_boundary_rotations(model, boundary)
    boundary_layers = [i for i, m in enumerate(get_boundary_rotations(model)) if m is not None]
    _untie_config_if_untied(model)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _quiet_progress()
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _patch_config(tmp, model, boundary_layers)
        if boundary_layers:
            shutil.copyfile(Path(modeling.__file__), tmp / MODELING_FILE)
        record = dict(metadata or {})
        record["export"] = {
            "format_version": FORMAT_VERSION,
            "boundary_layers": boundary_layers,
            "tied_embeddings": get_adapter(model).tied_embeddings,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "measured_sparsity": measured_sparsity(model),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _checkpoint_keys(folder: Path) -> set[str] | None:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return set(handle.keys())
    return None  # e.g. a .bin checkpoint: rely on transformers' loading info alone


def _check_strict(model: PreTrainedModel, info: dict[str, Any], folder: Path) -> None:
    problems = {
        key: sorted(info.get(key) or []) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems["error_msgs"] = list(info.get("error_msgs") or [])
    file_keys = _checkpoint_keys(folder)
    if file_keys is not None:
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        expected = set(model.state_dict()) - tied
        problems["missing_keys"] = sorted(set(problems["missing_keys"]) | (expected - file_keys))
        problems["unexpected_keys"] = sorted(
            set(problems["unexpected_keys"]) | (file_keys - set(model.state_dict()))
        )
    bad = {key: value for key, value in problems.items() if value}
    if bad:
        raise LoadingError(f"loading {folder} is not exact: {bad}")


def _quiet_progress() -> None:
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_memory: dict[int | str, int] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a folder strictly: any missing, unexpected or mis-shaped tensor raises LoadingError.

    Rotated folders are loaded with this package's classes (same code as the folder's copy of
    modeling_denoiserotator.py, without going through the remote-code module cache).
    max_memory ({GPU index: bytes}): split the model over those GPUs with accelerate
    (`gpu_device_map`: whole decoder layers per GPU, RuntimeError if anything would be offloaded
    to the CPU or disk) instead of putting it on `device`.
    """
    folder = Path(folder)
    _quiet_progress()
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    # the map that was checked for offloading is the one loaded with (gpu_device_map)
    placement: dict[str, Any] = {} if max_memory is None else {
        "device_map": gpu_device_map(folder, dtype, max_memory)
    }
    model_class = _model_class_of(folder, config)
    if model_class is not None:
        model, info = model_class.from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True, **placement
        )
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, output_loading_info=True, trust_remote_code=True, **placement
        )
    _check_strict(model, info, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # A model dispatched by accelerate must not be moved as a whole.
    return (model if max_memory is not None else model.to(device)).eval(), tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Load a model folder strictly and report its boundary rotations, sparsity and metadata."
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    model, _ = load_model(args.model)
    report = {
        "model": str(args.model),
        "class": type(model).__name__,
        "boundary_layers": [i for i, m in enumerate(get_boundary_rotations(model)) if m is not None],
        "tied_embeddings": get_adapter(model).tied_embeddings,
        "measured_sparsity": measured_sparsity(model),
        "metadata": read_metadata(args.model),
    }
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
