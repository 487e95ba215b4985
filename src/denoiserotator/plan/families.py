"""Refuse, at planning, a model whose family no adapter rotates exactly.

The architecture is read without downloading anything: from the family of a `tiny:` source,
the config.json of a `local:` folder or of an already fetched copy, the Hugging Face cache
(`hf:` sources fetched before, or pre-seeded for offline nodes), and otherwise the entry's
`architecture` key. A hub model of which none is known is checked by `fetch_model` right after
its download, before any calibration.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from denoiserotator.method.adapters import ADAPTERS, UnsupportedArchitectureError, adapter_class_for_config
from denoiserotator.settings import ModelEntry

__all__ = ["known_config", "family_problem"]


def _hub_cached_config(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json")
    return Path(found) if isinstance(found, str) else None


def known_config(entry: ModelEntry, fetched_dir: str) -> tuple[SimpleNamespace, str] | None:
    """(the parts of the config that choose an adapter, where they came from), or None if unknown."""
    kind, _, arg = entry.source.partition(":")
    if kind == "tiny":
        adapter = next(a for a in ADAPTERS if a.model_types[0] == arg)
        return SimpleNamespace(architectures=[adapter.architectures[0]], model_type=arg), entry.source
    if kind == "pypi-gguf":
        return SimpleNamespace(architectures=["LlamaForCausalLM"], model_type="llama"), entry.source
    candidates = [Path(arg) / "config.json"] if kind == "local" else [Path(fetched_dir) / "config.json"]
    if kind == "hf":
        cached = _hub_cached_config(arg)
        candidates += [cached] if cached else []
    for path in candidates:
        if path.is_file():
            config = json.loads(path.read_text())
            # a config.json naming neither (a placeholder) decides nothing: the next source does
            if config.get("architectures") or config.get("model_type"):
                named = {key: config.get(key) for key in ("architectures", "model_type")}
                return SimpleNamespace(**named), str(path)
    if entry.architecture:
        return SimpleNamespace(architectures=[entry.architecture], model_type=None), "its architecture key"
    return None


def family_problem(entry: ModelEntry, fetched_dir: str) -> str | None:
    """Why `entry` cannot be run (its architecture is refused or unknown to every adapter), or None."""
    found = known_config(entry, fetched_dir)
    if found is None:
        return None
    config, where = found
    try:
        adapter_class_for_config(config)
    except UnsupportedArchitectureError as error:
        return f"model {entry.slug!r} ({where}): {error}"
    return None
