"""Resumable progress of the prune stage: a checkpoint after finished layers, when to write one, and
resuming from it."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from denoiserotator.method.adapters import ModelAdapter
from denoiserotator.method.engine import place_layer
from denoiserotator.method.fingerprint import discard_checkpoint

log = logging.getLogger(__name__)


class CheckpointPolicy:
    """When to write a checkpoint: after a finished layer once `every_layers` layers (0: never by
    count) or `every_minutes` minutes (0: never by time) have passed since the last one (or the
    start). Each checkpoint rewrites all calibration activations (nsamples·seqlen·hidden values,
    4.3 GB for 70B in bf16), so writing one after every layer would cost 80× that per run."""

    def __init__(
        self, every_layers: int, every_minutes: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every_layers = every_layers
        self.every_seconds = 60.0 * every_minutes
        self.clock = clock
        self.last_time = clock()
        self.last_done = 0

    def start(self, done: int) -> None:
        """Count from `done` finished layers (those resumed) and from now."""
        self.last_done, self.last_time = done, self.clock()

    def due(self, done: int) -> bool:
        by_count = self.every_layers > 0 and done - self.last_done >= self.every_layers
        by_time = self.every_seconds > 0 and self.clock() - self.last_time >= self.every_seconds
        return by_count or by_time

    def saved(self, done: int) -> None:
        self.last_done, self.last_time = done, self.clock()


class LayerCheckpoint:
    """Progress on disk, so a killed job (time limit, node failure) resumes where it was.

    Finished layers are reported with `finished`; when `policy` says a checkpoint is due, the
    layers finished since the last one are written (weights, rotation, statistics: one file
    each), then the activations that feed the next layer (`hidden-<done>.pt`, a new file: the
    previous checkpoint's stay valid until the switch), then `progress.json`, written last,
    naming the settings and calibration it belongs to (so a checkpoint of other settings is
    never resumed), how many layers it holds and its activations file. Every file is replaced
    atomically, so a job killed at any instant leaves the previous or the new checkpoint, never
    a mix. Layers finished after the last checkpoint are redone on resume. Without a policy,
    every finished layer is a checkpoint.
    """

    def __init__(self, folder: Path, key: str, policy: CheckpointPolicy | None = None) -> None:
        self.folder = Path(folder)
        self.key = key
        self.policy = policy or CheckpointPolicy(every_layers=1, every_minutes=0)
        self.pending: list[tuple[int, dict[str, Any]]] = []

    def _progress(self) -> dict[str, Any] | None:
        progress = self.folder / "progress.json"
        return json.loads(progress.read_text()) if progress.exists() else None

    def done(self) -> int:
        record = self._progress()
        if record is None:
            return 0
        if record.get("key") == self.key:
            return int(record["done"])
        discard_checkpoint(self.folder, record.get("key"), self.key)
        return 0

    def finished(
        self,
        index: int,
        layer: nn.Module,
        rotation: torch.Tensor | None,
        record: dict[str, Any],
        hidden: list[torch.Tensor],
    ) -> bool:
        """Layer `index` is finished (on the host); `hidden` feeds layer index+1. Writes a
        checkpoint if one is due; returns whether it did."""
        # A copy of the weights, not a reference: nothing later must change what gets saved.
        state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in layer.state_dict().items()}
        self.pending.append((index, {"state": state, "rotation": rotation, "record": record}))
        if not self.policy.due(index + 1):
            return False
        self.save(index, hidden)
        return True

    def save(self, index: int, hidden: list[torch.Tensor]) -> None:
        """Write the pending layers, then `hidden` (the inputs of layer index+1) to a file of its
        own, then progress (the switch), then remove the activations it no longer names."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for pending_index, payload in self.pending:
            _atomic_save(payload, self.folder / f"layer-{pending_index:04d}.pt")
        hidden_name = f"hidden-{index + 1:04d}.pt"
        _atomic_save([batch.cpu() for batch in hidden], self.folder / hidden_name)
        record = {"key": self.key, "done": index + 1, "hidden": hidden_name}
        (self.folder / "progress.json.tmp").write_text(json.dumps(record))
        os.replace(self.folder / "progress.json.tmp", self.folder / "progress.json")
        for stale in self.folder.glob("hidden*.pt"):
            if stale.name != hidden_name:
                stale.unlink(missing_ok=True)
        self.pending.clear()
        self.policy.saved(index + 1)
        log.info("checkpoint after layer %d in %s", index, self.folder)

    def save_pending(self, done: int, hidden: list[torch.Tensor]) -> None:
        """Checkpoint now (a stop was requested): the `done` finished layers, `hidden` being the
        inputs of layer `done`. Nothing is written when the checkpoint on disk already holds them."""
        if self.pending:
            self.save(done - 1, hidden)
            log.info("stopping after a checkpoint of %d finished layer(s)", done)
        else:
            log.info("stopping; the checkpoint on disk holds the %d finished layer(s)", done)

    def load_layer(self, index: int) -> dict[str, Any]:
        return torch.load(self.folder / f"layer-{index:04d}.pt", weights_only=True)

    def load_hidden(self, device: torch.device) -> list[torch.Tensor]:
        """The activations the current progress.json names (`hidden.pt` in checkpoints written
        before they were numbered)."""
        name = (self._progress() or {}).get("hidden", "hidden.pt")
        return [batch.to(device) for batch in torch.load(self.folder / name, weights_only=True)]

    def resume(
        self, adapter: ModelAdapter, dtype: torch.dtype, device: torch.device
    ) -> tuple[list[torch.Tensor | None], list[dict[str, Any]], list[torch.Tensor] | None]:
        """Restore the checkpointed layers into `adapter`'s model: (R1 per restored layer, their
        records, the next layer's inputs); empty lists and None when there is nothing to resume."""
        done = self.done()
        self.policy.start(done)
        rotations: list[torch.Tensor | None] = []
        stats: list[dict[str, Any]] = []
        for index in range(done):
            saved = self.load_layer(index)
            place_layer(adapter, index, None, dtype)  # load_state_dict keeps each tensor's dtype
            adapter.prepare_rotated_structure(index, saved["state"])
            adapter.layers[index].load_state_dict(saved["state"], strict=True)
            rotations.append(saved["rotation"])
            stats.append(saved["record"])
        if not done:
            return rotations, stats, None
        log.info("resuming after layer %d from %s", done - 1, self.folder)
        return rotations, stats, self.load_hidden(device)


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to `path` through a temporary file; an interrupted save (SLURM's SIGTERM turned
    into an exception, a full disk) removes its partial file, which can be GBs of activations."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
