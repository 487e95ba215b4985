"""The sequential DenoiseRotator procedure (SPEC §5) and plain pruning through the same engine.

For each decoder layer (`process_layer`):

    fold norms → input statistics (Gram matrices on the current inputs, i.e. the outputs of the
    already rotated and pruned layers) → learn R1, R2 → fuse → prune the input groups in
    true-sequential order, re-collecting Gram matrices on the rotated, partly pruned layer →
    propagate: the finished layer's outputs are the next layer's inputs.

Activations are kept in the original basis between layers. `run_pipeline` loops over the layers;
`LayerCheckpoint` lets a killed job resume after its last finished layer.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import preemption
from .adapters import LINEAR_NAMES, LayerAdapter, ModelAdapter, get_adapter
from .checks import (
    check_grams,
    check_layer_input,
    check_layer_output,
    check_layer_weights,
    check_linear_inputs,
    preflight,
)
from .engine import capture_layer_inputs, place_layer, run_layer
from .fingerprint import checkpoint_key, discard_checkpoint, model_fingerprint
from .gram import collect_grams
from .logs import layer_summary
from .pruners import PRUNERS, SparsityPattern, parse_pattern, prune_weight
from .rotation.fuse import (
    RotatedLayer,
    fold_layer_norms,
    fuse_layer_rotation,
    merge_boundary_rotations,
    rotate,
)
from .rotation.train import LayerProblem, loss_statistic_inputs, train_rotation
from .settings import DTYPES, ComputeSettings, PruningSettings, RotationSettings, SettingsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneSettings:
    """What one rotate+prune job does: the grid's pruner and pattern plus the stage sections.

    pruner: one of PRUNERS, or "none" (the rotation-only row). pattern: "50%", "2:4", any N:M
    (None when nothing is pruned). rotation: the DenoiseRotator settings, or None for plain
    pruning. Raises SettingsError (a ValueError) on a combination that cannot run.
    """

    pruner: str = "wanda"
    pattern: str | None = "50%"
    rotation: RotationSettings | None = field(default_factory=RotationSettings)
    pruning: PruningSettings = field(default_factory=PruningSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.pruner not in (*PRUNERS, "none"):
            raise SettingsError(
                f"unknown pruner {self.pruner!r}; choose from {', '.join((*PRUNERS, 'none'))}"
            )
        if self.pruner == "none" and self.rotation is None:
            raise SettingsError("nothing to do: pruner 'none' without rotation is the dense model")
        if self.pruner != "none":
            if self.pattern is None:
                raise SettingsError(f"pruner {self.pruner!r} needs a sparsity pattern")
            parse_pattern(self.pattern)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PruneSettings:
        """From the prune rule's params (`Experiment.prune_params`): config sections, whole."""
        rotation = params.get("rotation")
        return cls(
            pruner=params["pruner"],
            pattern=params["pattern"],
            rotation=None if rotation is None else RotationSettings.from_mapping(rotation),
            pruning=PruningSettings.from_mapping(params["pruning"]),
            compute=ComputeSettings.from_mapping(params["compute"]),
        )

    @property
    def sparsity_pattern(self) -> SparsityPattern | None:
        return None if self.pruner == "none" else parse_pattern(self.pattern or "")

    @property
    def loss_score(self) -> str | None:
        return None if self.rotation is None else self.rotation.score_for(self.pruner)

    def checkpoint_identity(self) -> dict[str, Any]:
        """What a finished layer depends on, for the checkpoint key (`fingerprint.checkpoint_key`):
        pruner, pattern, the rotation and pruning settings that enter output ids, and of `compute`
        the dtype, the device type (CPU and CUDA kernels round differently) and
        `prune_batch_size` (it sets the order in which the Grams are summed). Left out: threads,
        GPU counts, evaluation settings and the checkpoint cadence, which cannot change a layer,
        so that editing one keeps a long job's progress."""
        return {
            "pruner": self.pruner,
            "pattern": self.pattern,
            "rotation": None if self.rotation is None else self.rotation.identity(),
            "pruning": self.pruning.identity(),
            "compute": {
                "dtype": self.compute.dtype,
                "device_type": torch.device(self.compute.resolved_device()).type,
                "prune_batch_size": self.compute.prune_batch_size,
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of the job, stored with its outputs."""
        pattern = self.sparsity_pattern
        return {
            "pruner": self.pruner,
            "pattern": None if pattern is None else str(pattern),
            "rotation": None
            if self.rotation is None
            else {**self.rotation.to_dict(), "loss_score": self.loss_score},
            "pruning": self.pruning.to_dict(),
            "compute": self.compute.to_dict(),
        }


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


# ---------------------------------------------------------------------------------------------
# the steps of one layer


class _InputsCollected(Exception):
    """Raised by a forward pre-hook once every linear of interest has received its input."""


@torch.no_grad()
def input_statistics(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    names: tuple[str, ...],
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    until: tuple[str, ...] = (),
    diagonal: bool = False,
) -> dict[str, torch.Tensor]:
    """Gram matrices H = Σ_t x_t x_tᵀ (in, in) of the inputs of `names`, running `hidden` through
    `layer`; with `diagonal`, only their diagonals Σ_t x_t² (in,), all Wanda reads.

    Each batch's forward stops at the entry of the last of `names` and `until` (linears whose
    inputs other pre-hooks, registered before this call, inspect) it reaches: nothing after it
    is needed, so the first group of a layer costs its input norm instead of a whole forward
    (`flops.input_statistics` counts the same)."""
    awaited = frozenset(names) | frozenset(until)
    entered: set[str] = set()

    def stop_when_all_entered(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple[torch.Tensor, ...]) -> None:
            entered.add(name)
            if entered >= awaited:
                raise _InputsCollected

        return hook

    with collect_grams({name: linears[name] for name in names}, diagonal) as accumulators:
        # registered after the Gram hooks (and the caller's), so those run first on the last input
        handles = [linears[name].register_forward_pre_hook(stop_when_all_entered(name)) for name in awaited]
        try:
            for batch in hidden:
                entered.clear()
                try:
                    layer(batch, **kwargs)
                except _InputsCollected:
                    pass
        finally:
            for handle in handles:
                handle.remove()
    return {name: acc.gram for name, acc in accumulators.items()}


def checked_statistics(
    view: LayerAdapter,
    index: int,
    names: tuple[str, ...],
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    purpose: str,
    watch: tuple[str, ...] = (),
    diagonal: bool = False,
) -> dict[str, torch.Tensor]:
    """`input_statistics` of layer `index`'s linears `names` (only the Grams' diagonals with
    `diagonal`), refused with NonFiniteError (naming
    the layer, the linear and `purpose`) when a Gram holds inf/NaN, before anything uses it.
    The inputs of the linears `watch` are only checked for inf/NaN in the same pass (no Gram), so
    an overflow there is named before any work too."""
    linears = view.linears()
    overflowed: list[str] = []

    def finite_check(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if name not in overflowed and not bool(torch.isfinite(args[0]).all()):
                overflowed.append(name)

        return hook

    handles = [linears[name].register_forward_pre_hook(finite_check(name)) for name in watch]
    try:
        grams = input_statistics(view.layer, linears, names, hidden, kwargs, until=watch, diagonal=diagonal)
    finally:
        for handle in handles:
            handle.remove()
    check_grams(grams, index, view.linear_paths, purpose, hidden[0].dtype)
    check_linear_inputs(overflowed, index, view.linear_paths, purpose, hidden[0].dtype)
    return grams


def learn_rotations(
    view: LayerAdapter,
    index: int,
    adapter: ModelAdapter,
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    settings: PruneSettings,
    description: str,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """SPEC §3–4 on a norm-folded layer: returns R1 (d, d), the R2 blocks (n_kv, d_head, d_head)
    and the training record. Magnitude needs no Gram matrices; the other scores take one per
    input group (the group's inputs are shared). Raises NonFiniteError on a non-finite Gram."""
    assert settings.rotation is not None and settings.loss_score is not None
    linears = view.linears()
    needed = tuple(loss_statistic_inputs(settings.rotation.loss_variant).values())  # type: ignore[arg-type]
    grams = (
        {} if settings.loss_score == "magnitude"
        else checked_statistics(view, index, needed, hidden, kwargs, "the rotation loss",
                                watch=tuple(name for name in linears if name not in needed))
    )  # fmt: skip
    problem = LayerProblem.from_layer(
        {name: linear.weight.data for name, linear in linears.items()},
        grams,
        settings.loss_score,  # type: ignore[arg-type]
        adapter.num_heads,
        adapter.num_kv_heads,
        adapter.head_dim,
        variant=settings.rotation.loss_variant,  # type: ignore[arg-type]
        percdamp=settings.pruning.percdamp,
    )
    del grams  # the statistics in `problem` are all training needs
    result = train_rotation(problem, settings.rotation, progress=progress, description=description,
                            callback=preemption.step_callback)  # fmt: skip
    return result.rotation, result.head_blocks, {**result.summary(), "loss_score": settings.loss_score}


def prune_groups(
    view: LayerAdapter,
    index: int,
    adapter: ModelAdapter,
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    settings: PruneSettings,
) -> dict[str, Any]:
    """Prune the input groups in true-sequential order (SPEC §5.3), Gram matrices re-collected
    before each group on the layer as it is now (rotated, earlier groups pruned). `hidden` is
    in the layer's own basis. Returns the damping each linear used and its sparsity. Raises
    NonFiniteError on a non-finite Gram, before the group is pruned."""
    pattern = settings.sparsity_pattern
    assert pattern is not None
    linears = view.linears()
    damping: dict[str, float | None] = {}
    for group in adapter.input_groups.values():
        # The linears of a group share their input, hence their Gram matrix: collect it once
        # (one (in, in) accumulator instead of three for q, k, v). Wanda reads only its diagonal.
        grams: dict[str, torch.Tensor] = {}
        if settings.pruner != "magnitude":
            purpose = f"pruning with {settings.pruner}"
            shared = checked_statistics(
                view, index, group[:1], hidden, kwargs, purpose, diagonal=settings.pruner == "wanda"
            )[group[0]]
            grams = dict.fromkeys(group, shared)
        for name in group:
            preemption.check()
            linear = linears[name]
            pruned = prune_weight(
                settings.pruner,
                linear.weight.data,
                grams.get(name),
                pattern,
                blocksize=settings.pruning.sparsegpt_blocksize,
                percdamp=settings.pruning.percdamp,
            )
            linear.weight.data = pruned.weight.to(linear.weight.dtype)
            damping[name] = pruned.damping
        del grams  # before the next group's statistics are collected, not after
    sparsity = {name: float((linears[name].weight.data == 0).float().mean()) for name in LINEAR_NAMES}
    return {"damping": damping, "sparsity": sparsity}


def to_basis(hidden: list[torch.Tensor], r1: torch.Tensor | None) -> list[torch.Tensor]:
    """Activations in the basis of a layer rotated by R1 (h·R1); unchanged without R1."""
    if r1 is None:
        return list(hidden)
    return [rotate(batch, r1) for batch in hidden]  # in fp32 for bf16 activations, as RotatedLayer


def propagate(
    layer: nn.Module, r1: torch.Tensor | None, hidden: list[torch.Tensor], kwargs: dict[str, Any], index: int
) -> list[torch.Tensor]:
    """The finished layer's outputs in the original basis: the next layer's inputs.
    Raises NonFiniteError on non-finite outputs."""
    outputs = run_layer(RotatedLayer(layer, r1) if r1 is not None else layer, hidden, kwargs)
    check_layer_output(outputs, index, hidden[0].dtype)
    return outputs


def process_layer(
    adapter: ModelAdapter,
    index: int,
    hidden: list[torch.Tensor],
    kwargs: dict[str, Any],
    settings: PruneSettings,
    progress: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, Any]]:
    """One layer of the method, in place: returns R1 (None without rotation), the next layer's
    inputs and the layer's record."""
    view = adapter.layer(index)
    record: dict[str, Any] = {"layer": index}
    r1: torch.Tensor | None = None
    if settings.rotation is not None:
        fold_layer_norms(view)
        r1, r2_blocks, trained = learn_rotations(
            view, index, adapter, hidden, kwargs, settings, f"layer {index} rotation", progress
        )
        fuse_layer_rotation(view, r1, r2_blocks, adapter.num_heads)
        record.update(trained)
    if settings.sparsity_pattern is not None:
        record.update(prune_groups(view, index, adapter, to_basis(hidden, r1), kwargs, settings))
    return r1, propagate(view.layer, r1, hidden, kwargs, index), record


def describe_layer(
    record: dict[str, Any], num_layers: int, done: list[dict[str, Any]], elapsed: float
) -> str:
    """One readable progress line for a finished layer (the SLURM log of a long job):

        layer 12/80: loss 812.3 → 640.1 (-21.2%), 400 steps (best at 388), sparsity 0.500, 41.2 s;
        ~2.6 h left

    `done`: the records of the layers finished in this process (resumed ones excluded from the
    rate); `elapsed`: seconds since the job started, so the estimate includes capture time.
    """
    parts = [layer_summary(record, num_layers) + ";"]
    timed = [r["seconds"] for r in done if "seconds" in r]
    remaining = num_layers - (record["layer"] + 1)
    left = remaining * sum(timed) / len(timed) if timed else float("nan")
    parts.append(f"~{_duration(left)} left" if remaining else f"done in {_duration(elapsed)}")
    return " ".join(parts)


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing timed yet
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# the loop


def run_pipeline(
    model: nn.Module,
    input_ids: torch.Tensor,
    settings: PruneSettings,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    merge_boundaries: bool = True,
) -> PipelineResult:
    """Rotate (optionally) and prune (optionally) `model` in place, layer by layer (SPEC §5).

    input_ids: (nsamples, seqlen) calibration token ids. The model stays on the host; one layer
    at a time moves to `settings.compute`'s device in its dtype. With `checkpoint_dir`, every
    finished layer is saved there at the checkpoints `settings.compute` asks for
    (`checkpoint_every_layers`, `checkpoint_every_minutes`), and a rerun with the same settings
    and calibration resumes after the last checkpointed layer.
    merge_boundaries=False keeps the unmerged in-memory form
    (each layer wrapped to rotate in and out by itself) instead of merged boundary matrices.
    """
    settings.validate()
    started = time.perf_counter()
    adapter = get_adapter(model)
    preflight(settings, adapter)  # everything checkable, before any activation is captured
    device = torch.device(settings.compute.resolved_device())
    dtype = DTYPES[settings.compute.dtype]
    batch_size = _divisor_at_most(input_ids.shape[0], settings.compute.prune_batch_size)
    inputs = capture_layer_inputs(adapter, input_ids, batch_size, device, dtype)

    compute = settings.compute
    checkpoint = (
        LayerCheckpoint(
            checkpoint_dir,
            checkpoint_key(settings.checkpoint_identity(), input_ids, model_fingerprint(model)),
            CheckpointPolicy(compute.checkpoint_every_layers, compute.checkpoint_every_minutes),
        )
        if checkpoint_dir
        else None
    )
    rotations, stats, hidden = checkpoint.resume(adapter, dtype, device) if checkpoint else ([], [], None)
    hidden = hidden if hidden is not None else inputs.hidden
    show = progress and sys.stderr.isatty()
    for index in tqdm(range(len(stats), adapter.num_layers), desc="layers", disable=not show):
        layer_started = time.perf_counter()
        try:
            place_layer(adapter, index, device, dtype)
            check_layer_input(hidden, index, input_ids if index == 0 else None, dtype)
            check_layer_weights(adapter.layers[index], index)
            r1, outputs, record = process_layer(
                adapter, index, hidden, inputs.layer_kwargs[index], settings, progress
            )
        except preemption.Preempted:
            # `hidden` still holds this layer's inputs: the finished layers and they are a checkpoint
            if checkpoint:
                checkpoint.save_pending(index, hidden)
            raise
        hidden = outputs
        adapter.layers[index] = adapter.layers[index].to("cpu")
        rotations.append(None if r1 is None else r1.to("cpu", torch.float32))
        record["seconds"] = time.perf_counter() - layer_started
        stats.append(record)
        if checkpoint and index < adapter.num_layers - 1:  # after the last layer the job is done
            checkpoint.finished(index, adapter.layers[index], rotations[-1], record, hidden)
            if preemption.requested():
                checkpoint.save_pending(index + 1, hidden)
                preemption.check()
        log.info("%s", describe_layer(record, adapter.num_layers, stats, time.perf_counter() - started))

    model.to("cpu")
    boundary, untied = None, False
    if settings.rotation is not None:
        boundary, untied = _place_rotations(adapter, rotations, merge_boundaries)
    return PipelineResult(model, boundary, rotations, stats, untied, time.perf_counter() - started)


def _place_rotations(
    adapter: ModelAdapter, rotations: list[torch.Tensor | None], merge: bool
) -> tuple[list[torch.Tensor | None] | None, bool]:
    """Merged: one Q_{i-1}ᵀQ_i per boundary, Q_0 in the embedding, Q_{L-1}ᵀ in lm_head (tied
    embeddings are untied; returns the boundaries and whether it untied). Unmerged: each layer
    wrapped to rotate in and out by itself (returns None, False)."""
    if not merge:
        for index, rotation in enumerate(rotations):
            adapter.layers[index] = RotatedLayer(adapter.layers[index], rotation)
        return None, False
    was_tied = adapter.tied_embeddings
    return merge_boundary_rotations(adapter, rotations), was_tied


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
