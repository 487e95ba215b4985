"""What identifies a run, for its per-layer checkpoints: a checkpoint resumes only its own run.

The key hashes everything that determines the result of the layer-by-layer procedure:
the source model (`model_fingerprint`), the code that computes a layer (`code_digest`: the
package's numerics sources, byte for byte, and the torch and transformers versions), the settings
that change a layer (`PruneSettings.checkpoint_identity`) and the calibration token ids. A
checkpoint with any other key is discarded (`discard_checkpoint`) with a log line, never resumed.

The model fingerprint is cheap for 70B-class models: the config, every tensor's name, shape and
dtype, small tensors (norms, biases) in full, and a fixed pseudo-random sample of
`SAMPLES_PER_TENSOR` elements of each large tensor: every tensor is sampled, none is read whole
(about 6 M elements for LLaMA-3-70B, well under a second).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SAMPLES_PER_TENSOR",
    "checkpoint_key",
    "code_digest",
    "discard_checkpoint",
    "model_fingerprint",
    "numerics_sources",
]

log = logging.getLogger(__name__)

SAMPLES_PER_TENSOR = 8192
# Config fields that do not change the weights or the computation of a decoder layer, or that
# the pipeline itself toggles; left out so that a moved folder or a runtime flag keeps the key.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "use_cache", "transformers_version", "dtype", "torch_dtype")


def _tensor_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    flat = tensor.reshape(-1)
    if flat.numel() > SAMPLES_PER_TENSOR:
        generator = torch.Generator().manual_seed(flat.numel())
        index = torch.randint(0, flat.numel(), (SAMPLES_PER_TENSOR,), generator=generator)
        flat = flat[index.to(flat.device)]
    data = flat.contiguous().cpu()
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def model_fingerprint(model: nn.Module) -> str:
    """A hex digest of the model as loaded: class, config and sampled tensor contents.

    Call it before the model is changed (the pipeline does, before capturing activations).
    """
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
        digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        _tensor_digest(digest, name, tensor)
    return digest.hexdigest()


# The sources that take part in computing a layer of the prune stage: the method, the stage and
# the settings it reads, and the files it writes the layers with. An edit to anything else (the
# plan, evaluation, tables, assets, logs) keeps a long job's checkpoints; an edit to these
# discards them, so that a checkpoint written before a change to the numerics is never resumed
# after it (a version string is not bumped by such changes).
NUMERICS_SOURCES = ("method", "prune.py", "settings.py", "files/export.py", "files/text.py",
                    "files/modeling_denoiserotator.py")  # fmt: skip


# the installed copy (site-packages, or the source tree of an editable install)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def numerics_sources(package: Path | None = None) -> list[Path]:
    """The `.py` files of `package` (default: PACKAGE_DIR) that take part in computing a layer
    (`NUMERICS_SOURCES`), sorted."""
    package = PACKAGE_DIR if package is None else package
    found = []
    for entry in NUMERICS_SOURCES:
        path = package / entry
        found += [p for p in path.rglob("*.py") if "__pycache__" not in p.parts] if path.is_dir() else [path]
    return sorted(found)


def code_digest(package: Path | None = None) -> str:
    """A hex digest of the code that computes a layer: every numerics source of `package` (default:
    PACKAGE_DIR; path and bytes) and the torch and transformers versions."""
    import transformers

    package = PACKAGE_DIR if package is None else package
    digest = hashlib.sha256(f"torch {torch.__version__}|transformers {transformers.__version__}|".encode())
    for path in numerics_sources(package):
        digest.update(f"{path.relative_to(package).as_posix()}|".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def checkpoint_key(identity: dict[str, Any], input_ids: torch.Tensor, fingerprint: str) -> str:
    """Key of one run: the settings that change a layer (`identity`, JSON-ready), the calibration
    ids, the source model's fingerprint and the code's digest (`code_digest`)."""
    digest = hashlib.sha256(
        json.dumps(
            {"settings": identity, "model": fingerprint, "code": code_digest()},
            sort_keys=True,
            default=str,
        ).encode()
    )
    ids = input_ids.detach().cpu().to(torch.int64).contiguous()
    digest.update(f"{tuple(ids.shape)}|".encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()[:16]


def discard_checkpoint(folder: Path, found_key: str | None, key: str) -> None:
    """Remove a checkpoint written by another run (other model, settings, calibration or code)."""
    folder = Path(folder)
    log.warning(
        "discarding the layer checkpoint in %s: it was written by another run (key %s, this run %s: "
        "a different source model, settings, calibration or code); starting from layer 0",
        folder,
        found_key,
        key,
    )
    for path in [folder / "progress.json", *folder.glob("hidden*.pt"), *folder.glob("layer-*.pt")]:
        path.unlink(missing_ok=True)
