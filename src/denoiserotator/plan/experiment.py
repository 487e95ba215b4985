"""The experiment grid of a validated config: rows, output paths and their ids. No Snakemake.

A row of the table is (model, pruner, pattern, rotation, refine, finetune). Every output path carries a
short hash of exactly the settings that determine it (config/README.md, "Output paths carry their
settings"), so a changed setting creates new paths for what depends on it and nothing else:

    results/models/<model>/c-<calibration id>/<pruner>_<pattern>_<none|dr-<rotation id>>/hf
    results/models/<model>/c-<calibration id>/<pruner>_<pattern>_<none|dr-<id>>_<lsq|swaps>-<id>/hf
    results/models/<model>/c-<calibration id>/none_dense_dr-<rotation id>/hf     (rotation only)
    results/models/<...variant...>/lora-<LoRA id>/hf
    results/eval/<row path>/{ppl-<set>-<id>,zeroshot-<id>,sparsity}.json

`Experiment` turns a config (after `snakemake.utils.validate`, or a plain dict with the same
keys) into those paths and into the settings objects each stage receives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from denoiserotator.method.pruners import PRUNERS, parse_pattern
from denoiserotator.method.pruners.refine import REFINE_METHODS
from denoiserotator.plan.families import family_problem
from denoiserotator.settings import (
    ComputeSettings,
    ModelEntry,
    PipelineConfig,
    RotationSettings,
    SettingsError,
    short_hash,
)

__all__ = ["Experiment", "Row", "VARIANT_RE", "ROW_RE", "pattern_slug", "pattern_from_slug", "variant_parts"]

_PRUNER_RE = "|".join(PRUNERS)
_REFINE_RE = "|".join(method for method in REFINE_METHODS if method != "none")
# An unrefined variant's name has no refinement part, so adding the `refine` axis renames nothing.
VARIANT_RE = (
    rf"({_PRUNER_RE})_([0-9]+pct|[0-9]+-[0-9]+)_(none|dr-[0-9a-f]{{8}})(_({_REFINE_RE})-[0-9a-f]{{8}})?"
    rf"|none_dense_dr-[0-9a-f]{{8}}"
)
ROW_RE = rf"[a-z0-9][a-z0-9.-]*/(dense|c-[0-9a-f]{{8}}/({VARIANT_RE})(/lora-[0-9a-f]{{8}})?)"


# hub sources -> the package's syntax for their local copy (denoiserotator.files.text)
HUB_SOURCES = {"c4": "c4-local", "wikitext2": "wikitext2-local"}


def pattern_slug(pattern: str) -> str:
    """'50%' -> '50pct', '2:4' -> '2-4' (file-name safe, reversible)."""
    return str(parse_pattern(pattern)).replace("%", "pct").replace(":", "-")


def pattern_from_slug(slug: str) -> str:
    return slug.replace("pct", "%").replace("-", ":")


def variant_parts(variant: str) -> tuple[str, str, str, str]:
    """(pruner, pattern, rotation, refine) of a prune job's folder name (`VARIANT_RE`):
    "wanda_2-4_dr-1a2b3c4d_swaps-5e6f7a8b" -> ("wanda", "2:4", "denoise", "swaps"); the pattern
    is "dense" for the rotation-only row."""
    pruner, pslug, rslug, *refined = variant.split("_")
    pattern = "dense" if pruner == "none" else pattern_from_slug(pslug)
    rotation = "none" if rslug == "none" else "denoise"
    return pruner, pattern, rotation, refined[0].split("-")[0] if refined else "none"


@dataclass(frozen=True)
class Row:
    """One row of the table and where its files live.

    pruner "none" with rotation "none" is the dense row, with rotation "denoise" the
    rotation-only row (pattern "dense" for both). `refine`: "none", or the refinement after
    pruning (`pruners.refine`). `calib`, `variant` and `lora` are the path components carrying
    the ids (None for the dense row / rows without LoRA).
    """

    model: str
    pruner: str
    pattern: str
    rotation: str
    finetune: str = "none"
    calib: str | None = None
    variant: str | None = None
    lora: str | None = None
    refine: str = "none"

    @property
    def path(self) -> str:
        if self.variant is None:
            return f"{self.model}/dense"
        path = f"{self.model}/{self.calib}/{self.variant}"
        return f"{path}/{self.lora}" if self.lora else path

    @property
    def prune_dir(self) -> str | None:
        """The prune stage's folder (holding hf/ and stats.json); None for the dense row."""
        return None if self.variant is None else f"results/models/{self.model}/{self.calib}/{self.variant}"

    def key(self) -> dict[str, str]:
        return {"model": self.model, "pruner": self.pruner, "pattern": self.pattern,
                "rotation": self.rotation, "refine": self.refine, "finetune": self.finetune}  # fmt: skip

    @classmethod
    def from_path(cls, path: str) -> Row:
        """Inverse of `path`; raises ValueError for a path no row can have."""
        if not re.fullmatch(ROW_RE, path):
            raise ValueError(f"{path!r} is not a row path ({ROW_RE})")
        parts = path.split("/")
        model = parts[0]
        if parts[1] == "dense":
            return cls(model, "none", "dense", "none")
        calib, variant = parts[1], parts[2]
        lora = parts[3] if len(parts) > 3 else None
        pruner, pattern, rotation, refine = variant_parts(variant)
        finetune = "lora" if lora else "none"
        return cls(model, pruner, pattern, rotation, finetune, calib, variant, lora, refine)


class Experiment:
    """A validated config as settings objects, grid rows and output paths.

    `config` is a `PipelineConfig` or a mapping of its keys (absent keys take the defaults).
    Raises SettingsError (a ValueError) on a bad config, naming the key.
    """

    def __init__(self, config: Mapping[str, Any] | PipelineConfig) -> None:
        settings = config if isinstance(config, PipelineConfig) else PipelineConfig.from_mapping(config)
        self.settings = settings
        self.resources_dir = str(Path(settings.resources_dir))
        self.models: dict[str, ModelEntry] = {m.slug: m for m in settings.models}
        self.calibration = settings.calibration
        self.rotation = settings.rotation
        self.pruning = settings.pruning
        self.refinement = settings.refinement
        self.compute = settings.compute
        self.lora = settings.finetune.lora
        self.finetune_data = settings.finetune.train
        self.perplexity = {s.name: s for s in settings.eval.perplexity}
        self.zeroshot = settings.eval.zeroshot
        refused = [p for m in settings.models if (p := family_problem(m, self.base_model_dir(m.slug)))]
        if refused:
            raise SettingsError("; ".join(refused))

    # -- ids ----------------------------------------------------------------------------------
    def calib_id(self) -> str:
        return f"c-{self.calibration.short_id()}"

    def rotation_identity(self, pruner: str, pattern: str | None = None) -> dict[str, Any]:
        """What a rotated row's rotations depend on besides model, pattern and calibration.
        `loss_groups: nm` only where it acts: rows with an N:M `pattern`."""
        identity = self.rotation.for_pattern(pattern).identity()
        identity["loss_score"] = self.rotation.score_for(pruner)
        identity["percdamp"] = self.pruning.percdamp  # the SparseGPT score's damping
        return identity

    def refine_identity(self, method: str) -> dict[str, Any]:
        """What a refined row's refinement depends on: its knobs and the damping of its solves."""
        return {**self.refinement.identity_for(method), "percdamp": self.pruning.percdamp}

    def variant_name(self, pruner: str, pattern: str | None, rotation: str, refine: str = "none") -> str:
        if pruner == "none":
            return f"none_dense_dr-{short_hash(self.rotation_identity('none'))}"
        rslug = "none" if rotation == "none" else f"dr-{short_hash(self.rotation_identity(pruner, pattern))}"
        name = f"{pruner}_{pattern_slug(pattern or '')}_{rslug}"
        return name if refine == "none" else f"{name}_{refine}-{short_hash(self.refine_identity(refine))}"

    def lora_id(self) -> str:
        return f"lora-{short_hash({'lora': self.lora.identity(), 'train': self.finetune_data.identity()})}"

    def ppl_id(self, name: str) -> str:
        return short_hash(self.perplexity[name].identity())

    def zeroshot_id(self) -> str:
        identity = self.zeroshot.identity()
        if self.zeroshot.source == "local":
            identity["corpus"] = self.corpus_dir()
        return short_hash(identity)

    def row_for(self, row_path: str) -> Row:
        """The row of a path, refusing paths made with settings other than this config's."""
        row = Row.from_path(row_path)
        expected = self._row(row.model, row.pruner, row.pattern, row.rotation, row.finetune, row.refine)
        if expected != row:
            raise ValueError(f"{row_path} was made with other settings than the config's ({expected.path})")
        return row

    # -- the grid -----------------------------------------------------------------------------
    def _row(
        self,
        model: str,
        pruner: str,
        pattern: str,
        rotation: str,
        finetune: str = "none",
        refine: str = "none",
    ) -> Row:
        if pruner == "none" and rotation == "none":
            return Row(model, "none", "dense", "none")
        variant = self.variant_name(pruner, None if pruner == "none" else pattern, rotation, refine)
        lora = self.lora_id() if finetune == "lora" else None
        return Row(model, pruner, pattern, rotation, finetune, self.calib_id(), variant, lora, refine)

    def rows(self) -> list[Row]:
        """The table's rows in order: per model dense, the grid, rotation-only, LoRA rows."""
        grid = self.settings
        rows = []
        for model in self.models:
            if grid.dense:
                rows.append(self._row(model, "none", "dense", "none"))
            for pruner in grid.pruners:
                for pattern in grid.patterns:
                    canonical = str(parse_pattern(pattern))
                    rows += [self._row(model, pruner, canonical, rot, refine=refine)
                             for refine in grid.refine for rot in grid.rotations]  # fmt: skip
            if grid.rotation_only:
                rows.append(self._row(model, "none", "dense", "denoise"))
            rows += [self._row(model, ft.pruner, str(parse_pattern(ft.pattern)), ft.rotation, "lora",
                               ft.refine) for ft in grid.finetune.rows]  # fmt: skip
        return rows

    # -- files --------------------------------------------------------------------------------
    def corpus_dir(self) -> str:
        source = self.settings.corpus.source
        return (
            str(Path(source.split(":", 1)[1]))
            if source.startswith("local:")
            else f"{self.resources_dir}/corpus"
        )

    def dataset_dir(self, name: str) -> str:
        """Local copy of a hub dataset (c4, wikitext2, lm-eval), written by the fetch_dataset rule."""
        return f"{self.resources_dir}/datasets/{name}"

    def resolve_source(self, spec: str) -> str:
        """corpus:NAME -> json:<corpus>/NAME.jsonl; the hub names c4 and wikitext2 -> their local
        copies (c4-local:<resources>/datasets/c4, ...), so compute jobs never download; any
        other source is the package's own syntax."""
        if spec.startswith("corpus:"):
            return f"json:{self.corpus_dir()}/{spec.split(':', 1)[1]}.jsonl"
        if spec in HUB_SOURCES:
            return f"{HUB_SOURCES[spec]}:{self.dataset_dir(spec)}"
        return spec

    def corpus_inputs(self, spec: str) -> list[str]:
        """The corpus folder or the hub dataset's local copy a source reads, so its fetch runs first."""
        if spec.startswith("corpus:"):
            return [self.corpus_dir()]
        return [self.dataset_dir(spec)] if spec in HUB_SOURCES else []

    def zeroshot_task_dir(self) -> str:
        """The lm-eval task YAMLs the zero-shot rule reads: the local fixtures or the hub copy."""
        return self.fixtures_dir() if self.zeroshot.source == "local" else self.dataset_dir("lm-eval")

    def fetch_targets(self) -> list[str]:
        """Everything this config downloads (local rules, run once on a machine with internet)."""
        sources = [self.calibration.source, *(s.dataset for s in self.perplexity.values())]
        if self.settings.finetune.rows:
            sources.append(self.finetune_data.source)
        targets = [self.base_model_dir(m) for m, entry in self.models.items()
                   if not entry.source.startswith("local:")]  # fmt: skip
        targets += [path for spec in sources for path in self.corpus_inputs(spec)]
        if self.zeroshot.tasks:
            targets.append(self.zeroshot_task_dir())
        return sorted(set(targets))

    def fixtures_dir(self) -> str:
        z = self.zeroshot
        return (f"{self.resources_dir}/zeroshot-tasks/"
                f"items{z.fixture_items}-seed{z.fixture_seed}-{short_hash(self.corpus_dir())}")  # fmt: skip

    def base_model_dir(self, model: str) -> str:
        source = self.models[model].source
        if source.startswith("local:"):
            return str(Path(source.split(":", 1)[1]))
        return f"{self.resources_dir}/models/{model}"

    def row_model_dir(self, row: Row) -> str:
        return self.base_model_dir(row.model) if row.variant is None else f"results/models/{row.path}/hf"

    def row_files(self, row: Row) -> dict[str, Any]:
        """Result files of a row: sparsity, perplexity per set, zero-shot, per-layer stats."""
        base = f"results/eval/{row.path}"
        files: dict[str, Any] = {
            "sparsity": f"{base}/sparsity.json",
            "ppl": {name: f"{base}/ppl-{name}-{self.ppl_id(name)}.json" for name in self.perplexity},
            "stats": f"{row.prune_dir}/stats.json" if row.prune_dir else None,
        }
        if self.zeroshot.tasks and self.zeroshot_selected(row):
            files["zeroshot"] = f"{base}/zeroshot-{self.zeroshot_id()}.json"
        return files

    def zeroshot_selected(self, row: Row) -> bool:
        """Whether `row` gets a zero-shot evaluation (`eval.zeroshot.rows`: null = every row; else
        a `pruner/pattern[/rotation[/finetune[/refine]]]` match; parts left out match anything)."""
        if self.zeroshot.rows is None:
            return True
        for selector in self.zeroshot.rows:
            pruner, pattern, *rest = selector.split("/")
            canonical = "dense" if pruner == "none" else str(parse_pattern(pattern))
            wanted = [pruner, canonical, *rest]
            if [row.pruner, row.pattern, row.rotation, row.finetune, row.refine][: len(wanted)] == wanted:
                return True
        return False

    def manifest(self) -> dict[str, Any]:
        """Everything the tables stage needs: rows with their files, and the settings shown."""
        return {
            "rows": [
                {
                    **row.key(),
                    "row": row.path,
                    "paper_name": self.models[row.model].paper_name,
                    "files": self.row_files(row),
                }
                for row in self.rows()
            ],  # fmt: skip
            "perplexity": {name: s.to_dict() for name, s in self.perplexity.items()},
            "zeroshot": self.zeroshot.to_dict(),
            "calibration": self.calibration.to_dict(),
            "rotation": self.rotation_settings_used(),
            "finetune": {"lora": self.lora.to_dict(), "train": self.finetune_data.to_dict()}
            if self.settings.finetune.rows
            else None,
        }

    def table_inputs(self) -> list[str]:
        files: list[str] = []
        for row in self.rows():
            f = self.row_files(row)
            files += [f["sparsity"], *f["ppl"].values(), *([f["zeroshot"]] if "zeroshot" in f else [])]
            files += [f["stats"]] if f["stats"] else []
        return sorted(set(files))

    # -- what each stage receives ---------------------------------------------------------------
    def model_dtype(self, model: str) -> str:
        return self.models[model].dtype or self.compute.dtype

    def compute_for(self, model: str) -> ComputeSettings:
        return self.compute.replace(dtype=self.model_dtype(model))

    def prune_params(self, model: str, calib: str, variant: str) -> dict[str, Any]:
        """The prune rule's params: the sections that determine this variant, each whole.

        The rotation section is left out of plain-pruning rows, and the knobs of optimizers that
        are not selected out of rotated ones, so that changing them never reruns a job through
        Snakemake's params trigger.
        """
        if calib != self.calib_id():
            raise ValueError(f"{calib} was made with other calibration settings ({self.calib_id()})")
        row = self.row_for(f"{model}/{calib}/{variant}")
        params: dict[str, Any] = {
            "pruner": row.pruner,
            "pattern": None if row.pruner == "none" else row.pattern,
            "pruning": self.pruning.to_dict(),
            "compute": self.compute_for(model).result_fields(),
        }
        if row.rotation == "denoise":
            pattern = None if row.pruner == "none" else row.pattern
            params["rotation"] = self.rotation_settings_used(self.rotation.for_pattern(pattern))
        if row.refine != "none":  # left out of unrefined rows: the refinement knobs rerun none of them
            params["refine"] = self.refinement.identity_for(row.refine)
        return params

    def rotation_settings_used(self, rotation: RotationSettings | None = None) -> dict[str, Any]:
        """The rotation section (or `rotation`, e.g. `RotationSettings.for_pattern` of a row's)
        without the knobs of optimizers that are not selected (`RotationSettings.identity`): what
        jobs and tables receive, so tuning another optimizer reruns nothing."""
        rotation = rotation or self.rotation
        used = rotation.identity()
        return {key: value for key, value in rotation.to_dict().items() if key in used}

    def ppl_params(self, name: str, row_path: str) -> dict[str, Any]:
        """The perplexity rule's params: the set (its dataset resolved) and the compute fields that
        can change a number (`ComputeSettings.RESULT_FIELDS`) in the row's model dtype (a bf16 entry
        is evaluated in bf16)."""
        settings = self.perplexity[name]
        return {"settings": {**settings.to_dict(), "dataset": self.resolve_source(settings.dataset)},
                "compute": self.compute_for(row_path.split("/", 1)[0]).result_fields()}  # fmt: skip

    def zeroshot_params(self, row_path: str) -> dict[str, Any]:
        """The zero-shot rule's params: the section and compute in the row's model dtype."""
        # `rows` chooses which rows are evaluated, not how: left out so changing it reruns nothing.
        settings = {key: value for key, value in self.zeroshot.to_dict().items() if key != "rows"}
        return {
            "settings": settings,
            "compute": self.compute_for(row_path.split("/", 1)[0]).result_fields(),
        }
