"""Shared fixtures and markers of the suite.

Markers (pyproject.toml): `slow` (end-to-end runs of the real workflow), `workflow` (plans or runs
Snakemake in a subprocess), `slurm` (needs the local SLURM test cluster: `make test-slurm`),
`gpu` (needs a CUDA device; skipped here without one).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def merged_config(name: str, **overlay: Any) -> dict[str, Any]:
    """config/config.yaml with config/`name` merged over it as Snakemake does (mappings key by key,
    lists whole), then `overlay`'s sections merged the same way."""

    def merge(base: dict, extra: dict) -> dict:
        out = copy.deepcopy(base)
        for key, value in extra.items():
            nested = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if nested else value
        return out

    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    if name != "config.yaml":
        config = merge(config, yaml.safe_load((ROOT / "config" / name).read_text()))
    return merge(config, overlay)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    """The repository's root folder."""
    return ROOT
