"""Collect the workflow's results into one table (CSV, Parquet, Markdown) and plots.

The workflow's ``tables`` rule writes a manifest (rows, their result files and the settings
that produced them) and calls :func:`build_tables`; the same works from the command line:

    python -m denoiserotator.tables build --manifest results/tables/manifest.json --out-dir results/tables
    python -m denoiserotator.tables sparsity --model results/models/.../hf --out sparsity.json

Zero-shot values are fractions (0-1); the paper's percentages are converted to fractions too.

Uncertainty (``denoiserotator.evaluate.uncertainty``): every zero-shot task has ``<task>_stderr`` (lm-eval's
standard error of the paper's metric), the average ``zeroshot_avg_stderr`` = sqrt(Σ se_i²)/k;
perplexity sets have ``ppl_<set>_nll_stderr`` (standard error of the mean NLL over windows) and
the interval ``ppl_<set>_low``/``_high`` = exp(nll ∓ se). A rotated row's
``zeroshot_avg_delta`` (rotated − plain, same model/pruner/pattern/finetune) is flagged
``zeroshot_avg_within_noise`` when |Δ| < 2·sqrt(se_a² + se_b²).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from denoiserotator.evaluate.uncertainty import NOISE_SIGMAS, mean_stderr, within_noise
from denoiserotator.files.jsonio import write_json as write_json_atomic  # the name the workflow script uses
from denoiserotator.logs import layer_summary

log = logging.getLogger(__name__)

KEY_COLUMNS = ["model", "pruner", "pattern", "rotation", "refine", "finetune"]
PAPER_TASK_KEYS = {
    "piqa": "piqa",
    "winogrande": "wg",
    "hellaswag": "hs",
    "arc_easy": "arce",
    "arc_challenge": "arcc",
}
PAPER_PRUNERS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
# The rotation-only row must reproduce dense perplexity (rotations are exact reparametrisations).
DENSE_MATCH_RTOL = 1e-3


# ----------------------------------------------------------------------------------------------
# files


def _replace_atomic(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` and rename into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def _read_json(path: str | Path | None) -> dict[str, Any] | None:
    if not path:
        return None
    with open(path) as handle:
        return json.load(handle)


def write_sparsity(model_dir: Path, out: Path) -> dict[str, Any]:
    """Measured sparsity of the seven decoder linears, read back from a saved folder's safetensors
    one tensor at a time (`export.folder_sparsity`: no model is built, so a 70B folder needs the
    memory of one weight matrix)."""
    from denoiserotator.files.export import folder_sparsity

    result = {"model": str(model_dir), **folder_sparsity(model_dir)}
    write_json_atomic(out, result)
    return result


def load_paper_results() -> list[dict[str, Any]]:
    """Rows of the paper's appendix G tables (copied from the paper into the package)."""
    text = resources.files("denoiserotator").joinpath("data/paper_results.json").read_text()
    return json.loads(text)["rows"]


# ----------------------------------------------------------------------------------------------
# the table


def paper_row(
    paper: list[dict[str, Any]],
    paper_name: str | None,
    pruner: str,
    pattern: str,
    rotation: str,
    finetune: str,
) -> dict[str, Any] | None:
    """The paper's row for the same setting, or None (no paper model, LoRA, rotation-only)."""
    if not paper_name or finetune != "none":
        return None
    if pruner == "none":
        if rotation != "none":
            return None
        sp, method = "0%", "Dense"
    else:
        sp, method = pattern, PAPER_PRUNERS[pruner]
    for row in paper:
        if (
            row["model"] == paper_name
            and row["sp"] == sp
            and row["method"] == method
            and bool(row["denoise_rotator"]) == (rotation == "denoise" and method != "Dense")
        ):
            return row
    return None


def _layer_means(stats: dict[str, Any] | None, key: str) -> float | None:
    if not stats:
        return None
    values = [layer[key] for layer in stats.get("layers", []) if layer.get(key) is not None]
    return float(sum(values) / len(values)) if values else None


def collect(manifest: dict[str, Any]) -> pd.DataFrame:
    """One row per manifest row with sparsity, perplexities, zero-shot results and paper values."""
    paper = load_paper_results()
    sets = manifest.get("perplexity", {})
    tasks = list(manifest.get("zeroshot", {}).get("tasks", []))
    records = []
    for entry in manifest["rows"]:
        files = entry["files"]
        # manifests written before the refine axis existed have no "refine": their rows are unrefined
        record: dict[str, Any] = {key: entry.get(key, "none") if key == "refine" else entry[key]
                                  for key in KEY_COLUMNS}  # fmt: skip
        sparsity = _read_json(files.get("sparsity"))
        record["measured_sparsity"] = sparsity["overall"] if sparsity else None
        for name in sets:
            result = _read_json(files["ppl"].get(name)) or {}
            record[f"ppl_{name}"] = result.get("ppl")
            # Older result files have no per-window spread: their uncertainty stays empty.
            for key in ("nll_stderr", "ppl_low", "ppl_high"):
                record[f"ppl_{name}_{key.removeprefix('ppl_')}"] = result.get(key)
        zeroshot = _read_json(files.get("zeroshot"))
        for task in tasks:
            record[task] = zeroshot["tasks"][task]["value"] if zeroshot else None
        for task in tasks:
            record[f"{task}_stderr"] = zeroshot["tasks"][task].get("stderr") if zeroshot else None
        if tasks:
            record["zeroshot_avg"] = zeroshot["zeroshot_avg"] if zeroshot else None
            # Recomputed from the tasks' errors (not read back) so old JSONs get it too.
            record["zeroshot_avg_stderr"] = (
                mean_stderr([record[f"{task}_stderr"] for task in tasks]) if zeroshot else None
            )
        stats = _read_json(files.get("stats"))
        record["entropy_before"] = _layer_means(stats, "entropy_before")
        record["entropy_after"] = _layer_means(stats, "entropy_after")
        record["prune_seconds"] = stats.get("seconds") if stats else None
        # the rotation budget actually spent: mean steps run per layer (an early stop ends sooner)
        record["rotation_steps_mean"] = _layer_means(stats, "rotation_steps")
        paper_values = None if record["refine"] != "none" else paper_row(  # the paper refines nothing
            paper,
            entry.get("paper_name"),
            entry["pruner"],
            entry["pattern"],
            entry["rotation"],
            entry["finetune"],
        )
        for name, spec in sets.items():
            key = spec.get("paper")
            record[f"paper_ppl_{name}"] = paper_values.get(key) if paper_values and key else None
        for task in tasks:
            value = paper_values.get(PAPER_TASK_KEYS[task]) if paper_values else None
            record[f"paper_{task}"] = value / 100 if value is not None else None
        if tasks:
            avg = paper_values.get("avg") if paper_values else None
            record["paper_zeroshot_avg"] = avg / 100 if avg is not None else None
        records.append(record)
    table = pd.DataFrame.from_records(records)
    table["rotation_only_matches_dense"] = _dense_check(table, list(sets))
    if tasks:
        table["zeroshot_avg_delta"], table["zeroshot_avg_within_noise"] = _noise_check(table)
    return table


def plain_counterpart(table: pd.DataFrame, row: pd.Series) -> pd.Series | None:
    """The unrotated row with the same model, pruner, pattern, refinement and finetune as a rotated
    ``row`` (the dense row for the rotation-only row); None for unrotated rows or when there is none."""
    if row["rotation"] != "denoise":
        return None
    match = table[(table["model"] == row["model"]) & (table["pruner"] == row["pruner"])
                  & (table["pattern"] == row["pattern"]) & (table["finetune"] == row["finetune"])
                  & (table["refine"] == row["refine"]) & (table["rotation"] == "none")]  # fmt: skip
    return None if match.empty else match.iloc[0]


def _noise_check(table: pd.DataFrame) -> tuple[list[float | None], list[bool | None]]:
    """Per row: zero-shot average of the rotated row minus its plain counterpart's, and whether
    |Δ| < NOISE_SIGMAS·sqrt(se_a² + se_b²) (None where a row, a value or an error is missing)."""
    deltas: list[float | None] = []
    flags: list[bool | None] = []
    for _, row in table.iterrows():
        plain = plain_counterpart(table, row)
        values = None if plain is None else (row["zeroshot_avg"], plain["zeroshot_avg"])
        if values is None or any(pd.isna(v) for v in values):
            deltas.append(None)
            flags.append(None)
            continue
        deltas.append(float(values[0] - values[1]))
        se = [_number(r, "zeroshot_avg_stderr") for r in (row, plain)]
        flags.append(within_noise(float(values[0]), se[0], float(values[1]), se[1]))
    return deltas, flags


def _dense_check(table: pd.DataFrame, sets: list[str]) -> list[bool | None]:
    """For rotation-only rows: every perplexity within DENSE_MATCH_RTOL of the same model's dense row."""
    out: list[bool | None] = []
    for _, row in table.iterrows():
        if not (row["pruner"] == "none" and row["rotation"] == "denoise" and row["finetune"] == "none"):
            out.append(None)
            continue
        dense = table[
            (table["model"] == row["model"])
            & (table["pruner"] == "none")
            & (table["rotation"] == "none")
            & (table["finetune"] == "none")
        ]
        if dense.empty or not sets:
            out.append(None)
            continue
        ok = True
        for name in sets:
            a, b = row[f"ppl_{name}"], dense.iloc[0][f"ppl_{name}"]
            if pd.isna(a) or pd.isna(b) or not math.isclose(a, b, rel_tol=DENSE_MATCH_RTOL):
                ok = False
                log.warning(
                    "rotation-only %s ppl_%s = %s differs from dense %s by more than %g relative",
                    row["model"],
                    name,
                    a,
                    b,
                    DENSE_MATCH_RTOL,
                )
        out.append(ok)
    return out


# ----------------------------------------------------------------------------------------------
# outputs


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"
    return str(value)


def to_markdown(table: pd.DataFrame, manifest: dict[str, Any]) -> str:
    """The table as Markdown with the settings that produced it (for the README and the report)."""
    lines = ["## Settings", ""]
    # Every field of these sections, so that a new setting shows up without an edit here.
    for section in ("calibration", "rotation"):
        fields = manifest.get(section) or {}
        lines.append(f"- {section}: " + ", ".join(f"{key} {_fmt(value)}" for key, value in fields.items()))
    for name, spec in manifest.get("perplexity", {}).items():
        windows = spec.get("max_windows") or "all"
        note = f" ({spec['note']})" if spec.get("note") else ""
        lines.append(
            f"- perplexity `{name}`: `{spec['dataset']}`, seqlen {spec['seqlen']}, windows {windows}{note}"
        )
    zs = manifest.get("zeroshot", {})
    if zs.get("tasks"):
        lines.append(
            f"- zero-shot: {', '.join(zs['tasks'])} ({zs.get('source')} tasks, "
            f"limit {zs.get('limit') or 'none'} per task)"
        )
    if manifest.get("finetune"):
        for part, fields in manifest["finetune"].items():
            described = ", ".join(f"{key} {_fmt(value)}" for key, value in fields.items())
            lines.append(f"- LoRA {part}: {described}")
    # Uncertainty is shown next to its value ("0.6267 ± 0.0395", "37.83 [36.9, 38.8]"), so the
    # columns that carry it are folded into their value's column here (main.csv keeps them apart).
    folded = {c for c in table.columns
              if c.endswith("_stderr") and c.removesuffix("_stderr") in table.columns}  # fmt: skip
    for name in manifest.get("perplexity", {}):
        folded |= {f"ppl_{name}_nll_stderr", f"ppl_{name}_low", f"ppl_{name}_high"}
    columns = [c for c in table.columns if c not in folded
               and (not c.startswith("paper_") or table[c].notna().any())]  # fmt: skip
    lines += [
        "",
        "## Results",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row, c) for c in columns) + " |")
    lines += _layer_lines(manifest)
    lines += ["", "## Notes", ""]
    if zs.get("tasks"):
        lines += [
            "- Zero-shot values are fractions ± lm-eval's standard error of the paper's metric "
            "(sample sd of the per-item scores / sqrt(n)); the average's is sqrt(Σ se_i²) / k over "
            "the k tasks (disjoint items, so independent errors).",
            f"- `zeroshot_avg_delta`: a rotated row's zero-shot average minus its plain counterpart's "
            f"(same model, pruner, pattern, finetune; dense for rotation-only). `within noise` when "
            f"|Δ| < {NOISE_SIGMAS:g}·sqrt(se_a² + se_b²) (≈ 95%; the two rows are treated as "
            f"independent, which overstates the noise of a same-items comparison), `beyond noise` "
            f"otherwise.",
        ]
    if manifest.get("perplexity"):
        lines.append(
            "- Perplexity [low, high] = exp(mean NLL ∓ se), se = sd of the per-window mean NLLs "
            "/ sqrt(windows) (consecutive windows of one text: an estimate of the noise)."
        )
    return "\n".join(lines) + "\n"


def _layer_lines(manifest: dict[str, Any]) -> list[str]:
    """Per rotated prune job, its per-layer lines as the job logged them (`logs.layer_summary`)."""
    lines: list[str] = []
    seen: set[str] = set()
    for entry in manifest["rows"]:
        path = entry["files"].get("stats")
        if entry["rotation"] != "denoise" or not path or path in seen:
            continue
        seen.add(path)  # a LoRA row shares its prune job's stats
        layers = (_read_json(path) or {}).get("layers", [])
        if not layers:
            continue
        if not lines:
            lines += ["", "## Rotation per layer", ""]
        lines += [f"### {entry['model']} {entry['pruner']} {entry['pattern']}", "", "```"]
        lines += [layer_summary(layer, len(layers)) for layer in layers]
        lines += ["```", ""]
    return lines


def _cell(row: pd.Series, column: str) -> str:
    """A Markdown cell: the value, with its uncertainty where the table carries one."""
    value = row[column]
    if column == "zeroshot_avg_within_noise":
        return "" if pd.isna(value) else ("within noise" if value else "beyond noise")
    if column == "zeroshot_avg_delta":
        return "" if pd.isna(value) else f"{value:+.4f}"
    stderr = row.get(f"{column}_stderr")
    if stderr is not None and not pd.isna(stderr) and not pd.isna(value):
        return f"{_fmt(value)} ± {_fmt(stderr)}"
    low, high = row.get(f"{column}_low"), row.get(f"{column}_high")
    if column.startswith("ppl_") and low is not None and not pd.isna(low) and not pd.isna(high):
        return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]"
    return _fmt(value)


def plot_perplexity(table: pd.DataFrame, sets: list[str], path: Path) -> Any:
    """Bars of perplexity per pruner × pattern, plain vs rotated, with exp(nll ± se) error bars
    where the result files carry them; dashed line: dense. Writes ``path``, returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    panels = [(m, s) for m in models for s in sets]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6 * max(len(panels), 1), 4), squeeze=False)
    for ax, (model, name) in zip(axes[0], panels, strict=False):
        rows = table[(table["model"] == model) & (table["finetune"] == "none") & (table["pruner"] != "none")]
        groups = list(dict.fromkeys(zip(rows["pruner"], rows["pattern"], rows["refine"], strict=True)))
        width = 0.4
        for offset, rotation in ((-width / 2, "none"), (width / 2, "denoise")):
            values, below, above = [], [], []
            for pruner, pattern, refine in groups:
                match = rows[(rows["pruner"] == pruner) & (rows["pattern"] == pattern)
                             & (rows["refine"] == refine) & (rows["rotation"] == rotation)]  # fmt: skip
                row = match.iloc[0] if not match.empty else {}
                value, low, high = (_number(row, f"ppl_{name}{suffix}") for suffix in ("", "_low", "_high"))
                values.append(value)
                # matplotlib wants distances below/above the bar; no interval -> a zero-length bar.
                below.append(value - low if not math.isnan(low) else 0.0)
                above.append(high - value if not math.isnan(high) else 0.0)
            label = "DenoiseRotator" if rotation == "denoise" else "no rotation"
            ax.bar([i + offset for i in range(len(groups))], values, width, label=label,
                   yerr=[below, above], capsize=3)  # fmt: skip
        dense = table[(table["model"] == model) & (table["pruner"] == "none") & (table["rotation"] == "none")]
        if not dense.empty and not pd.isna(dense.iloc[0][f"ppl_{name}"]):
            ax.axhline(dense.iloc[0][f"ppl_{name}"], color="k", linestyle="--", label="dense")
        ax.set_xticks(range(len(groups)), [_group_label(*group) for group in groups])
        ax.set_yscale("log")
        ax.set_title(f"{model}: perplexity ({name})")
        ax.legend(fontsize="small")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no perplexity sets configured", ha="center")
    fig.tight_layout()
    _replace_atomic(path, fig.savefig)
    plt.close(fig)
    return fig


def _group_label(pruner: str, pattern: str, refine: str, finetune: str = "none") -> str:
    """A plot's x label: `wanda\n50%`, `+swaps` for a refined row, `+lora` for a fine-tuned one."""
    extra = [f"+{part}" for part in (refine, finetune) if part != "none"]
    return "\n".join([pruner, pattern, *extra])


def _number(row: Any, key: str) -> float:
    """``row[key]`` as a float, NaN when the row or the value is missing."""
    value = row.get(key) if hasattr(row, "get") else None
    return float("nan") if value is None or pd.isna(value) else float(value)


def plot_zeroshot(table: pd.DataFrame, path: Path) -> Any:
    """Zero-shot average per row with ±1 standard-error bars (``zeroshot_avg_stderr``), plain vs
    rotated side by side; "≈" over a pair whose difference is within noise. Writes ``path``,
    returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Without zero-shot tasks there is nothing to draw: one empty panel that says so.
    models = list(dict.fromkeys(table["model"])) if "zeroshot_avg" in table else []
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(8 * max(len(models), 1), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        # Rows left out of zero-shot (eval.zeroshot.rows) get no empty slot.
        rows = table[(table["model"] == model) & table["zeroshot_avg"].notna()]
        groups = list(dict.fromkeys(zip(rows["pruner"], rows["pattern"], rows["refine"], rows["finetune"],
                                        strict=True)))  # fmt: skip
        width = 0.4
        for offset, rotation in ((-width / 2, "none"), (width / 2, "denoise")):
            values, errors = [], []
            for pruner, pattern, refine, finetune in groups:
                match = rows[(rows["pruner"] == pruner) & (rows["pattern"] == pattern)
                             & (rows["refine"] == refine) & (rows["finetune"] == finetune)
                             & (rows["rotation"] == rotation)]  # fmt: skip
                row = match.iloc[0] if not match.empty else {}
                values.append(100 * _number(row, "zeroshot_avg"))
                stderr = _number(row, "zeroshot_avg_stderr")
                errors.append(0.0 if math.isnan(stderr) else 100 * stderr)
            label = "DenoiseRotator" if rotation == "denoise" else "no rotation"
            ax.bar([i + offset for i in range(len(groups))], values, width, label=label, yerr=errors,
                   capsize=3)  # fmt: skip
        if "zeroshot_avg_within_noise" in rows:
            for i, (pruner, pattern, refine, finetune) in enumerate(groups):
                flag = rows[(rows["pruner"] == pruner) & (rows["pattern"] == pattern)
                            & (rows["refine"] == refine)
                            & (rows["finetune"] == finetune)]["zeroshot_avg_within_noise"]  # fmt: skip
                if (flag == True).any():  # noqa: E712 (a column of True/False/None)
                    ax.annotate("≈", (i, 1), xycoords=("data", "axes fraction"), ha="center", va="top")
        ax.set_xticks(range(len(groups)), [_group_label(*group) for group in groups])
        ax.set_ylabel("zero-shot average (%)")
        ax.set_title(f"{model}: zero-shot average ± 1 s.e. (≈: rotated vs plain within noise)")
        ax.legend(fontsize="small", loc="lower left")
    if not models:
        axes[0][0].text(0.5, 0.5, "no zero-shot results", ha="center")
    fig.tight_layout()
    _replace_atomic(path, fig.savefig)
    plt.close(fig)
    return fig


def plot_entropy(manifest: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in manifest["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        drawn = 0
        for entry in manifest["rows"]:
            if entry["model"] != model or entry["rotation"] != "denoise" or entry["finetune"] != "none":
                continue
            stats = _read_json(entry["files"].get("stats"))
            layers = [layer for layer in (stats or {}).get("layers", []) if "entropy_before" in layer]
            if not layers:
                continue
            x = [layer["layer"] for layer in layers]
            label = f"{entry['pruner']} {entry['pattern']}" + (
                f" +{entry['refine']}" if entry.get("refine", "none") != "none" else ""
            )
            (line,) = ax.plot(x, [layer["entropy_after"] for layer in layers], label=f"{label} after")
            ax.plot(
                x,
                [layer["entropy_before"] for layer in layers],
                linestyle="--",
                color=line.get_color(),
                label=f"{label} before",
            )
            drawn += 1
        ax.set_xlabel("layer")
        ax.set_ylabel("rotation loss (entropy)")
        ax.set_title(f"{model}: entropy before (dashed) / after (solid)")
        if drawn:
            ax.legend(fontsize="x-small", ncol=2)
        else:
            ax.text(0.5, 0.5, "no rotated rows", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    _replace_atomic(path, fig.savefig)
    plt.close(fig)


def build_tables(
    manifest_path: Path,
    csv: Path,
    parquet: Path,
    markdown: Path,
    ppl_plot: Path,
    entropy_plot: Path,
    zeroshot_plot: Path | None = None,
) -> pd.DataFrame:
    """Read the manifest's result files and write the table (CSV, Parquet, Markdown) and plots
    (``zeroshot_plot`` only when given and zero-shot tasks are configured); returns the table."""
    manifest = _read_json(manifest_path)
    table = collect(manifest)
    _replace_atomic(Path(csv), lambda p: table.to_csv(p, index=False))
    _replace_atomic(Path(parquet), lambda p: table.to_parquet(p, index=False))
    text = to_markdown(table, manifest)
    _replace_atomic(Path(markdown), lambda p: Path(p).write_text(text))
    plot_perplexity(table, list(manifest.get("perplexity", {})), Path(ppl_plot))
    plot_entropy(manifest, Path(entropy_plot))
    if zeroshot_plot is not None:
        plot_zeroshot(table, Path(zeroshot_plot))
    log.info("wrote %d rows to %s", len(table), csv)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m denoiserotator.tables", description="Results tables and plots of the workflow."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="main.csv/.parquet/.md, ppl.png, entropy.png, zeroshot.png "
                                         "from a manifest")  # fmt: skip
    build.add_argument("--manifest", type=Path, required=True)
    build.add_argument("--out-dir", type=Path, required=True)
    sparsity = sub.add_parser("sparsity", help="measured sparsity of a saved model folder")
    sparsity.add_argument("--model", type=Path, required=True)
    sparsity.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.command == "build":
        out = args.out_dir
        build_tables(
            args.manifest,
            out / "main.csv",
            out / "main.parquet",
            out / "main.md",
            out / "ppl.png",
            out / "entropy.png",
            out / "zeroshot.png",
        )
    else:
        write_sparsity(args.model, args.out)


if __name__ == "__main__":
    main()
