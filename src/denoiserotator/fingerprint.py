"""What identifies a run, for its per-layer checkpoints: a checkpoint resumes only its own run.

The key hashes everything that determines the result of the layer-by-layer procedure:
the source model (`model_fingerprint`), the package and library versions, the settings and
the calibration token ids. A checkpoint with any other key is discarded (`discard_checkpoint`)
with a log line, never resumed.

The model fingerprint is cheap for 70B-class models: the config, every tensor's name, shape and
dtype, small tensors (norms, biases) in full, and a fixed pseudo-random sample of
`SAMPLES_PER_TENSOR` elements of each large tensor: every tensor is sampled, none is read whole
(about 6 M elements for LLaMA-3-70B, well under a second).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "SAMPLES_PER_TENSOR",
    "checkpoint_key",
    "discard_checkpoint",
    "model_fingerprint",
    "versions",
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


def versions() -> dict[str, str]:
    """Versions of the code that computes a layer: this package, torch, transformers."""
    import transformers

    from . import __version__

    return {
        "denoiserotator": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def checkpoint_key(settings: Any, input_ids: torch.Tensor, fingerprint: str) -> str:
    """Key of one run: settings, calibration ids, source model fingerprint and code versions."""
    settings_data = asdict(settings) if is_dataclass(settings) else dict(vars(settings))
    digest = hashlib.sha256(
        json.dumps(
            {"settings": settings_data, "model": fingerprint, "versions": versions()},
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
        "a different source model, settings, calibration or package version); starting from layer 0",
        folder,
        found_key,
        key,
    )
    for path in [folder / "progress.json", *folder.glob("hidden*.pt"), *folder.glob("layer-*.pt")]:
        path.unlink(missing_ok=True)
