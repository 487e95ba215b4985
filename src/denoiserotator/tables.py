"""Collect the workflow's results into one table (CSV, Parquet, Markdown) and plots.

The workflow's ``tables`` rule writes a manifest (rows, their result files and the settings
that produced them) and calls :func:`build_tables`; the same works from the command line:

    python -m denoiserotator.tables build --manifest results/tables/manifest.json --out-dir results/tables
    python -m denoiserotator.tables sparsity --model results/models/.../hf --out sparsity.json

Zero-shot values are fractions (0-1); the paper's percentages are converted to fractions too.
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

from .jsonio import write_json as write_json_atomic  # the name the workflow script uses

log = logging.getLogger(__name__)

KEY_COLUMNS = ["model", "pruner", "pattern", "rotation", "finetune"]
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
    from .export import folder_sparsity

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
        record: dict[str, Any] = {key: entry[key] for key in KEY_COLUMNS}
        sparsity = _read_json(files.get("sparsity"))
        record["measured_sparsity"] = sparsity["overall"] if sparsity else None
        for name in sets:
            result = _read_json(files["ppl"].get(name))
            record[f"ppl_{name}"] = result["ppl"] if result else None
        zeroshot = _read_json(files.get("zeroshot"))
        for task in tasks:
            record[task] = zeroshot["tasks"][task]["value"] if zeroshot else None
        if tasks:
            record["zeroshot_avg"] = zeroshot["zeroshot_avg"] if zeroshot else None
        stats = _read_json(files.get("stats"))
        record["entropy_before"] = _layer_means(stats, "entropy_before")
        record["entropy_after"] = _layer_means(stats, "entropy_after")
        record["prune_seconds"] = stats.get("seconds") if stats else None
        paper_values = paper_row(
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
    return table


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
    columns = [c for c in table.columns if not c.startswith("paper_") or table[c].notna().any()]
    lines += [
        "",
        "## Results",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_perplexity(table: pd.DataFrame, sets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    panels = [(m, s) for m in models for s in sets]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6 * max(len(panels), 1), 4), squeeze=False)
    for ax, (model, name) in zip(axes[0], panels, strict=False):
        rows = table[(table["model"] == model) & (table["finetune"] == "none") & (table["pruner"] != "none")]
        groups = list(dict.fromkeys(zip(rows["pruner"], rows["pattern"], strict=True)))
        width = 0.4
        for offset, rotation in ((-width / 2, "none"), (width / 2, "denoise")):
            values = []
            for pruner, pattern in groups:
                match = rows[
                    (rows["pruner"] == pruner) & (rows["pattern"] == pattern) & (rows["rotation"] == rotation)
                ]
                values.append(match.iloc[0][f"ppl_{name}"] if not match.empty else float("nan"))
            label = "DenoiseRotator" if rotation == "denoise" else "no rotation"
            ax.bar([i + offset for i in range(len(groups))], values, width, label=label)
        dense = table[(table["model"] == model) & (table["pruner"] == "none") & (table["rotation"] == "none")]
        if not dense.empty and not pd.isna(dense.iloc[0][f"ppl_{name}"]):
            ax.axhline(dense.iloc[0][f"ppl_{name}"], color="k", linestyle="--", label="dense")
        ax.set_xticks(range(len(groups)), [f"{p}\n{pat}" for p, pat in groups])
        ax.set_yscale("log")
        ax.set_title(f"{model}: perplexity ({name})")
        ax.legend(fontsize="small")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no perplexity sets configured", ha="center")
    fig.tight_layout()
    _replace_atomic(path, fig.savefig)
    plt.close(fig)


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
            label = f"{entry['pruner']} {entry['pattern']}"
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
    manifest_path: Path, csv: Path, parquet: Path, markdown: Path, ppl_plot: Path, entropy_plot: Path
) -> pd.DataFrame:
    manifest = _read_json(manifest_path)
    table = collect(manifest)
    _replace_atomic(Path(csv), lambda p: table.to_csv(p, index=False))
    _replace_atomic(Path(parquet), lambda p: table.to_parquet(p, index=False))
    text = to_markdown(table, manifest)
    _replace_atomic(Path(markdown), lambda p: Path(p).write_text(text))
    plot_perplexity(table, list(manifest.get("perplexity", {})), Path(ppl_plot))
    plot_entropy(manifest, Path(entropy_plot))
    log.info("wrote %d rows to %s", len(table), csv)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m denoiserotator.tables", description="Results tables and plots of the workflow."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="main.csv/.parquet/.md, ppl.png, entropy.png from a manifest")
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
        )
    else:
        write_sparsity(args.model, args.out)


if __name__ == "__main__":
    main()
