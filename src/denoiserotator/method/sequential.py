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

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from denoiserotator import preemption
from denoiserotator.logs import layer_summary
from denoiserotator.method.adapters import LINEAR_NAMES, LayerAdapter, ModelAdapter, get_adapter
from denoiserotator.method.checkpoint import CheckpointPolicy, LayerCheckpoint
from denoiserotator.method.checks import (
    check_layer_input,
    check_layer_output,
    check_layer_weights,
    preflight,
)
from denoiserotator.method.engine import capture_layer_inputs, place_layer, run_layer
from denoiserotator.method.fingerprint import checkpoint_key, model_fingerprint
from denoiserotator.method.pruners import PRUNERS, SparsityPattern, parse_pattern, prune_weight
from denoiserotator.method.pruners.refine import REFINE_METHODS, refine_weight
from denoiserotator.method.rotation.fuse import (
    RotatedLayer,
    fold_layer_norms,
    fuse_layer_rotation,
    merge_boundary_rotations,
    rotate,
)
from denoiserotator.method.rotation.problem import LayerProblem, loss_statistic_inputs
from denoiserotator.method.rotation.train import train_rotation
from denoiserotator.method.statistics import checked_statistics
from denoiserotator.settings import (
    DTYPES,
    ComputeSettings,
    PruningSettings,
    RefinementSettings,
    RotationSettings,
    SettingsError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneSettings:
    """What one rotate+prune job does: the grid's pruner and pattern plus the stage sections.

    pruner: one of PRUNERS, or "none" (the rotation-only row). pattern: "50%", "2:4", any N:M
    (None when nothing is pruned). rotation: the DenoiseRotator settings, or None for plain
    pruning. refine: "none", "lsq" or "swaps" after each linear's pruner (`pruners.refine`),
    with `refinement`'s knobs. Raises SettingsError (a ValueError) on a combination that cannot
    run.
    """

    pruner: str = "wanda"
    pattern: str | None = "50%"
    rotation: RotationSettings | None = field(default_factory=RotationSettings)
    pruning: PruningSettings = field(default_factory=PruningSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    refine: str = "none"
    refinement: RefinementSettings = field(default_factory=RefinementSettings)

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
        if self.refine not in REFINE_METHODS:
            choices = ", ".join(REFINE_METHODS)
            raise SettingsError(f"unknown refinement {self.refine!r}; choose from {choices}")
        if self.refine != "none" and self.pruner == "none":
            raise SettingsError("refinement needs a pruner: the rotation-only row prunes nothing")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PruneSettings:
        """From the prune rule's params (`Experiment.prune_params`): config sections, whole."""
        rotation = params.get("rotation")
        refine = params.get("refine") or {"method": "none"}
        return cls(
            pruner=params["pruner"],
            pattern=params["pattern"],
            rotation=None if rotation is None else RotationSettings.from_mapping(rotation),
            pruning=PruningSettings.from_mapping(params["pruning"]),
            compute=ComputeSettings.from_mapping(params["compute"]),
            refine=refine["method"],
            refinement=RefinementSettings.from_mapping({k: v for k, v in refine.items() if k != "method"}),
        )

    @property
    def sparsity_pattern(self) -> SparsityPattern | None:
        return None if self.pruner == "none" else parse_pattern(self.pattern or "")

    @property
    def loss_row_block(self) -> int:
        """M of the N:M-aware loss: the pattern's M with `rotation.loss_groups: nm` and an N:M
        pattern, else 0 (the paper's row groups)."""
        pattern = self.sparsity_pattern
        if self.rotation is None or self.rotation.for_pattern(pattern).loss_groups != "nm":
            return 0
        return int(pattern.m)  # type: ignore[union-attr]

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
        identity = {
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
        if self.refine != "none":  # absent otherwise: the checkpoints of unrefined jobs keep their keys
            identity["refine"] = self.refinement.identity_for(self.refine)
        return identity

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
            "refine": None if self.refine == "none" else self.refinement.identity_for(self.refine),
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
        row_block=settings.loss_row_block,
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
    in the layer's own basis. With `settings.refine`, each pruned linear is refined on the same
    Gram (full, for every pruner). Returns the damping each linear used, its sparsity and, when
    refined, the relative reconstruction error before and after refinement per linear,
    sqrt(f / tr(W H Wᵀ)) (`pruners.refine`), and the refinement's seconds. Raises
    NonFiniteError on a non-finite Gram, before the group is pruned."""
    pattern = settings.sparsity_pattern
    assert pattern is not None
    linears = view.linears()
    damping: dict[str, float | None] = {}
    refined: dict[str, list[float]] = {}
    refine_seconds = 0.0
    needs_gram = settings.pruner != "magnitude" or settings.refine != "none"
    for group in adapter.input_groups.values():
        # The linears of a group share their input, hence their Gram matrix: collect it once
        # (one (in, in) accumulator instead of three for q, k, v). Wanda reads only its diagonal,
        # unless the refinement needs the whole Gram.
        grams: dict[str, torch.Tensor] = {}
        if needs_gram:
            purpose = f"pruning with {settings.pruner}"
            diagonal = settings.pruner == "wanda" and settings.refine == "none"
            shared = checked_statistics(
                view, index, group[:1], hidden, kwargs, purpose, diagonal=diagonal
            )[group[0]]
            grams = dict.fromkeys(group, shared)
        for name in group:
            preemption.check()
            linear = linears[name]
            dense = linear.weight.data
            pruned = prune_weight(
                settings.pruner,
                dense,
                grams.get(name),  # magnitude reads none
                pattern,
                blocksize=settings.pruning.sparsegpt_blocksize,
                percdamp=settings.pruning.percdamp,
            )
            if settings.refine != "none":
                started = time.perf_counter()
                result = refine_weight(
                    dense, pruned.weight, pruned.mask, grams[name], pattern, settings.refine,  # type: ignore[arg-type]
                    max_swaps=settings.refinement.max_swaps, candidates=settings.refinement.candidates,
                    percdamp=settings.pruning.percdamp,
                )  # fmt: skip
                refine_seconds += time.perf_counter() - started
                refined[name] = list(result.relative_errors)
                pruned.weight = result.weight
            linear.weight.data = pruned.weight.to(linear.weight.dtype)
            damping[name] = pruned.damping
        del grams  # before the next group's statistics are collected, not after
    sparsity = {name: float((linears[name].weight.data == 0).float().mean()) for name in LINEAR_NAMES}
    record: dict[str, Any] = {"damping": damping, "sparsity": sparsity}
    if refined:
        record.update(refine_error=refined, refine_seconds=refine_seconds)
    return record


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
