"""The equal-settings table: share of the perplexity gap to dense that rotation closes, per seed.

Reads the JSON files `bench/magnitude_study.py --layers 0` writes (whole model, so `ppl` is the
model's perplexity on the held-out windows) and, for every pruner × pattern and every rotated
mode, pairs each seed's rotated run with the same seed's `plain` and `dense` runs:

    share = (ppl_plain − ppl_rotated) / (ppl_plain − ppl_dense)

Prints JSON (per seed and mean ± sample standard deviation) and, with `--markdown`, the README
table. Two modes are compared seed by seed (`--compare A B`: mean and spread of the per-seed
difference of their shares), so a difference is told apart from the spread between seeds.

    .venv/bin/python -m bench.gap_table bench/results/equal_settings_*.json --markdown \
        --compare rotate:100 rotate-ref:100:paper --modes rotate:100 rotate-ref:100:paper
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


SMOLLM2_LAYERS = 30  # magnitude_study's model; fewer processed layers give no model perplexity


def load_runs(
    paths: list[Path], latest: bool = False, seeds: list[int] | None = None
) -> list[dict[str, Any]]:
    """Every run of every file; a (seed, pruner, pattern, mode) measured twice is refused, or
    with `latest` the later file's run replaces the earlier one (a remeasurement with newer
    code: the replaced file is named on stderr). `seeds`: only these seeds' runs."""
    runs: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for path in paths:
        report = json.loads(path.read_text())
        if report.get("layers") not in (SMOLLM2_LAYERS, None):
            print(f"{path}: {report['layers']} layers, not the whole model: skipped", file=sys.stderr)
            continue
        for run in report["runs"]:
            if seeds is not None and run["seed"] not in seeds:
                continue
            key = (run["seed"], run["pruner"], run.get("pattern"), run["mode"])
            if run["mode"] == "dense":
                key = (run["seed"], "none", None, "dense")
                if key in seen:  # every file measures dense; equal calibration gives the same value
                    continue
            elif key in seen:
                if not latest:
                    raise SystemExit(f"{key} is in both {seen[key]} and {path}")
                print(f"{key}: {path} replaces {seen[key]}", file=sys.stderr)
                runs = [r for r in runs if (r["seed"], r["pruner"], r.get("pattern"), r["mode"]) != key]
            seen[key] = path
            runs.append(run)
    return runs


def gap_table(runs: list[dict[str, Any]], compare: tuple[str, str] | None = None) -> dict[str, Any]:
    """Per pruner × pattern: plain and rotated perplexities and gap shares over the seeds."""
    dense = {r["seed"]: r["ppl"] for r in runs if r["mode"] == "dense"}
    by_pair: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        if run["mode"] != "dense":
            by_pair[(run["pruner"], run["pattern"])][run["mode"]][run["seed"]] = run["ppl"]
    rows = []
    for (pruner, pattern), modes in sorted(by_pair.items()):
        plain = modes.get("plain", {})
        row: dict[str, Any] = {"pruner": pruner, "pattern": pattern, "modes": {}}
        seeds = sorted(set(plain) & set(dense))
        row["dense"] = _spread([dense[s] for s in seeds]) if seeds else None
        row["plain"] = _spread([plain[s] for s in seeds]) if seeds else None
        shares: dict[str, dict[int, float]] = {}
        for mode, ppl in sorted(modes.items()):
            if mode == "plain":
                continue
            paired = [s for s in seeds if s in ppl]
            if not paired:
                continue
            shares[mode] = {s: (plain[s] - ppl[s]) / (plain[s] - dense[s]) for s in paired}
            row["modes"][mode] = {
                "ppl": _spread([ppl[s] for s in paired]),
                "share_closed": _spread([shares[mode][s] for s in paired]),
                "seeds": paired,
            }
        if compare and all(mode in shares for mode in compare):
            first, second = (shares[mode] for mode in compare)
            common = sorted(set(first) & set(second))
            if common:
                row["share_difference"] = {
                    "modes": list(compare),
                    **_spread([first[s] - second[s] for s in common]),
                    "seeds": common,
                }
        rows.append(row)
    return {"rows": rows}


def _fmt(spread: dict[str, Any] | None, digits: int = 1, percent: bool = False) -> str:
    if spread is None:
        return "–"
    scale = 100 if percent else 1
    text = f"{spread['mean'] * scale:.{digits}f}"
    if spread["sd"] is not None:
        text += f" ± {spread['sd'] * scale:.{digits}f}"
    return text + (" %" if percent else "")


def markdown(table: dict[str, Any], modes: list[str], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    header = ["pair", "seeds", "dense PPL", "plain PPL"]
    for mode in modes:
        header += [f"{labels.get(mode, mode)}: PPL", "gap closed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [
            f"{row['pruner']} {row['pattern']}",
            str(row["plain"]["n"]) if row["plain"] else "0",
            _fmt(row["dense"], 2),
            _fmt(row["plain"]),
        ]
        for mode in modes:
            entry = row["modes"].get(mode)
            if entry is None:
                cells += ["–", "–"]
                continue
            seeds = "" if entry["seeds"] == list(range(row["plain"]["n"])) else f" (seeds {entry['seeds']})"
            cells += [_fmt(entry["ppl"]), _fmt(entry["share_closed"], 0, percent=True) + seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--compare", nargs=2, metavar=("MODE_A", "MODE_B"))
    parser.add_argument("--markdown", action="store_true", help="also print the README table")
    parser.add_argument("--modes", nargs="+", help="the table's rotated modes, in order (default: all)")
    parser.add_argument("--label", nargs="+", default=[], metavar="MODE=TEXT", help="column names")
    parser.add_argument("--latest", action="store_true", help="a run measured again: the later file's counts")
    parser.add_argument("--seeds", type=int, nargs="+", help="only these calibration seeds")
    args = parser.parse_args(argv)
    runs = load_runs(args.files, args.latest, args.seeds)
    table = gap_table(runs, tuple(args.compare) if args.compare else None)
    print(json.dumps(table, indent=1))
    if args.markdown:
        modes = args.modes or sorted({mode for row in table["rows"] for mode in row["modes"]})
        labels = dict(item.rsplit("=", 1) for item in args.label)  # modes may hold "="
        print(markdown(table, modes, labels))


if __name__ == "__main__":
    main()
