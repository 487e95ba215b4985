"""The sequential DenoiseRotator procedure (SPEC §5) and plain pruning through the same engine.

For each decoder layer: fold norms → Gram matrices on the current inputs (outputs of the
already rotated and pruned layers) → learn R1, R2 → fuse → prune in true-sequential groups,
re-collecting Gram matrices on the rotated, partly pruned layer → outputs become the next
layer's inputs. Activations are kept in the original basis between layers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import LINEAR_NAMES, SEQUENTIAL_GROUPS, get_adapter
from .checks import (
    check_grams,
    check_layer_input,
    check_layer_output,
    check_layer_weights,
    check_settings,
    preflight,
)
from .engine import capture_layer_inputs, run_layer
from .fingerprint import checkpoint_key, discard_checkpoint, model_fingerprint
from .gram import collect_grams
from .pruners import PRUNERS, parse_pattern, prune_weight
from .rotation.fuse import RotatedLayer, fold_layer_norms, fuse_layer_rotation, merge_boundary_rotations
from .rotation.loss import SCORES
from .rotation.train import LayerProblem, RotationSettings, train_rotation

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class PruneSettings:
    pruner: str = "wanda"  # one of PRUNERS, or "none" (rotation only)
    pattern: str | None = "50%"
    rotation: Literal["none", "denoise"] = "denoise"
    steps: int = 2000
    lr: float = 0.01
    clip: float = 1.0
    loss_variant: Literal["paper", "reference"] = "paper"
    loss_score: str | None = None  # score the rotation loss uses; defaults to the pruner's
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 8
    sparsegpt_blocksize: int = 128
    percdamp: float = 0.01
    merge_boundaries: bool = True

    def validate(self) -> None:
        check_settings(self)
        if self.pruner not in (*PRUNERS, "none"):
            raise ValueError(f"unknown pruner {self.pruner!r}; choose from {', '.join((*PRUNERS, 'none'))}")
        if self.rotation not in ("none", "denoise"):
            raise ValueError(f"unknown rotation {self.rotation!r}; choose 'none' or 'denoise'")
        if self.pruner == "none" and self.rotation == "none":
            raise ValueError("nothing to do: pruner 'none' with rotation 'none' is the dense model")
        if self.pruner != "none":
            if self.pattern is None:
                raise ValueError(f"pruner {self.pruner!r} needs a sparsity pattern")
            parse_pattern(self.pattern)
        if self.rotation == "denoise" and self.resolved_loss_score not in SCORES:
            raise ValueError(f"loss score {self.resolved_loss_score!r} not one of {SCORES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.steps < 0 or self.lr <= 0:
            raise ValueError("rotation steps must be >= 0 and lr > 0")

    @property
    def resolved_loss_score(self) -> str:
        if self.loss_score:
            return self.loss_score
        return "wanda" if self.pruner == "none" else self.pruner

    def rotation_settings(self) -> RotationSettings:
        return RotationSettings(
            steps=self.steps, lr=self.lr, clip=self.clip, variant=self.loss_variant, percdamp=self.percdamp
        )


@dataclass
class PipelineResult:
    model: nn.Module
    boundary: list[torch.Tensor | None] | None
    rotations: list[torch.Tensor | None]
    layer_stats: list[dict[str, Any]] = field(default_factory=list)
    untied_embeddings: bool = False
    seconds: float = 0.0


def _divisor_at_most(total: int, limit: int) -> int:
    # All batches must share a shape so that the captured masks fit every batch.
    return max(d for d in range(1, min(total, max(limit, 1)) + 1) if total % d == 0)


def _rotate(hidden: list[torch.Tensor], rotation: torch.Tensor | None) -> list[torch.Tensor]:
    if rotation is None:
        return list(hidden)
    rotation = rotation.to(hidden[0].dtype)
    return [batch @ rotation for batch in hidden]


@torch.no_grad()
def _grams_for(
    layer: nn.Module,
    names: tuple[str, ...],
    linears: dict[str, nn.Linear],
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
) -> dict[str, torch.Tensor]:
    with collect_grams({name: linears[name] for name in names}) as accumulators:
        run_layer(layer, hidden, kwargs)
    return {name: acc.gram for name, acc in accumulators.items()}


class LayerCheckpoint:
    """Per-layer progress on disk, so a killed job (time limit, node failure) resumes where it was.

    After layer i: its finished weights, its rotation and statistics, and the activations that
    feed layer i+1; `progress.json` is written last and names the settings and calibration it
    belongs to, so a checkpoint of other settings is never resumed.
    """

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = Path(folder)
        self.key = key

    def done(self) -> int:
        progress = self.folder / "progress.json"
        if not progress.exists():
            return 0
        record = json.loads(progress.read_text())
        if record.get("key") == self.key:
            return int(record["done"])
        discard_checkpoint(self.folder, record.get("key"), self.key)
        return 0

    def save(
        self,
        index: int,
        layer: nn.Module,
        rotation: torch.Tensor | None,
        record: dict[str, Any],
        hidden: list[torch.Tensor],
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {"state": layer.state_dict(), "rotation": rotation, "record": record},
            self.folder / f"layer-{index:04d}.pt",
        )
        _atomic_save([batch.cpu() for batch in hidden], self.folder / "hidden.pt")
        (self.folder / "progress.json.tmp").write_text(json.dumps({"key": self.key, "done": index + 1}))
        os.replace(self.folder / "progress.json.tmp", self.folder / "progress.json")

    def load_layer(self, index: int) -> dict[str, Any]:
        return torch.load(self.folder / f"layer-{index:04d}.pt", weights_only=True)

    def load_hidden(self, device: torch.device) -> list[torch.Tensor]:
        return [batch.to(device) for batch in torch.load(self.folder / "hidden.pt", weights_only=True)]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_pipeline(
    model: nn.Module,
    input_ids: torch.Tensor,
    settings: PruneSettings,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
) -> PipelineResult:
    """Rotate (optionally) and prune (optionally) `model` in place, layer by layer.

    With `checkpoint_dir`, every finished layer is saved there and a rerun with the same
    settings and calibration resumes after the last finished layer.
    """
    settings.validate()
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    dtype = DTYPES[settings.dtype]
    adapter = get_adapter(model)
    preflight(settings, adapter)
    key = checkpoint_key(settings, input_ids, model_fingerprint(model)) if checkpoint_dir else ""
    pattern = parse_pattern(settings.pattern) if settings.pruner != "none" else None
    rotate = settings.rotation == "denoise"
    batch_size = _divisor_at_most(input_ids.shape[0], settings.batch_size)

    inputs = capture_layer_inputs(adapter, input_ids, batch_size, device, dtype)
    hidden = inputs.hidden
    rotations: list[torch.Tensor | None] = []
    stats: list[dict[str, Any]] = []
    checkpoint = LayerCheckpoint(checkpoint_dir, key) if checkpoint_dir else None
    resume_from = checkpoint.done() if checkpoint else 0
    for index in range(resume_from):
        saved = checkpoint.load_layer(index)
        layer = adapter.layers[index].to(dtype=dtype)
        layer.load_state_dict(saved["state"], strict=True)
        rotations.append(saved["rotation"])
        stats.append(saved["record"])
    if resume_from:
        hidden = checkpoint.load_hidden(device)
        log.info("resuming after layer %d from %s", resume_from - 1, checkpoint_dir)
    show = progress and sys.stderr.isatty()
    for index in tqdm(range(resume_from, adapter.num_layers), desc="layers", disable=not show):
        layer_started = time.perf_counter()
        layer = adapter.layers[index].to(device=device, dtype=dtype)
        view = adapter.wrap_layer(layer)
        linears = view.linears()
        kwargs = inputs.layer_kwargs[index]
        record: dict[str, Any] = {"layer": index}
        rotation: torch.Tensor | None = None
        check_layer_input(hidden, index, input_ids if index == 0 else None, dtype)
        check_layer_weights(layer, index)

        if rotate:
            fold_layer_norms(view)
            score = settings.resolved_loss_score
            grams = (
                _grams_for(layer, ("q", "o", "gate", "down"), linears, hidden, kwargs)
                if score != "magnitude"
                else {}
            )
            check_grams(grams, index, view.linear_paths, "the rotation loss", dtype)
            problem = LayerProblem.from_layer(
                {name: linear.weight.data for name, linear in linears.items()},
                grams,
                score,  # type: ignore[arg-type]
                adapter.num_heads,
                adapter.num_kv_heads,
                adapter.head_dim,
                variant=settings.loss_variant,
                percdamp=settings.percdamp,
            )
            result = train_rotation(
                problem,
                settings.rotation_settings(),
                progress=progress,
                description=f"layer {index} rotation",
            )
            rotation = result.rotation.to(device)
            fuse_layer_rotation(view, rotation, result.head_blocks.to(device), adapter.num_heads)
            record.update(result.summary())
            record["loss_score"] = score
            del problem, grams

        if pattern is not None:
            rotated_hidden = _rotate(hidden, rotation)
            damping: dict[str, float | None] = {}
            for group in SEQUENTIAL_GROUPS:
                grams = (
                    _grams_for(layer, group, linears, rotated_hidden, kwargs)
                    if settings.pruner != "magnitude"
                    else {}
                )
                check_grams(grams, index, view.linear_paths, f"pruning with {settings.pruner}", dtype)
                for name in group:
                    linear = linears[name]
                    pruned = prune_weight(
                        settings.pruner,
                        linear.weight.data,
                        grams.get(name),
                        pattern,
                        blocksize=settings.sparsegpt_blocksize,
                        percdamp=settings.percdamp,
                    )
                    linear.weight.data = pruned.weight.to(linear.weight.dtype)
                    damping[name] = pruned.damping
            record["damping"] = damping
            record["sparsity"] = {
                name: float((linears[name].weight.data == 0).float().mean()) for name in LINEAR_NAMES
            }

        step_layer = RotatedLayer(layer, rotation) if rotation is not None else layer
        hidden = run_layer(step_layer, hidden, kwargs)
        check_layer_output(hidden, index, dtype)
        adapter.layers[index] = layer.to("cpu")
        rotations.append(None if rotation is None else rotation.to("cpu", torch.float32))
        record["seconds"] = time.perf_counter() - layer_started
        stats.append(record)
        if checkpoint:
            checkpoint.save(index, layer, rotations[-1], record, hidden)
        log.info("layer %d: %s", index, {k: v for k, v in record.items() if k not in ("sparsity", "damping")})

    model.to("cpu")
    untied = False
    boundary: list[torch.Tensor | None] | None = None
    if rotate:
        was_tied = adapter.tied_embeddings
        if settings.merge_boundaries:
            boundary = merge_boundary_rotations(adapter, rotations)
            untied = was_tied
        else:
            # Unmerged in-memory form: each layer rotates in and out by itself.
            for index, rotation in enumerate(rotations):
                adapter.layers[index] = RotatedLayer(adapter.layers[index], rotation)
    return PipelineResult(model, boundary, rotations, stats, untied, time.perf_counter() - started)


def settings_dict(settings: PruneSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["pattern"] = (
        str(parse_pattern(settings.pattern)) if settings.pattern and settings.pruner != "none" else None
    )
    return data


def mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
