"""bench/gap_table.py: the share of the perplexity gap closed, paired by seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gap_table.py"


def _gap_table():
    spec = importlib.util.spec_from_file_location("gap_table", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(path: Path, runs: list[tuple[int, str, str, float]]) -> Path:
    body = {"layers": 30, "runs": []}
    for seed, mode, pruner, ppl in runs:
        run = {"seed": seed, "mode": mode, "pruner": "none" if mode == "dense" else pruner, "ppl": ppl}
        if mode != "dense":
            run["pattern"] = "50%"
        body["runs"].append(run)
    path.write_text(json.dumps(body))
    return path


def test_shares_are_paired_with_the_same_seeds_plain_and_dense(tmp_path: Path) -> None:
    gap = _gap_table()
    first = _report(tmp_path / "a.json", [(0, "dense", "", 10.0), (0, "plain", "wanda", 30.0),
                                          (0, "rot", "wanda", 20.0), (0, "ref", "wanda", 25.0)])  # fmt: skip
    # seed 1 has another dense and plain: its share must use them, not seed 0's
    second = _report(tmp_path / "b.json", [(1, "dense", "", 12.0), (1, "plain", "wanda", 52.0),
                                           (1, "rot", "wanda", 22.0), (1, "ref", "wanda", 42.0)])  # fmt: skip
    table = gap.gap_table(gap.load_runs([first, second]), ("rot", "ref"))
    (row,) = table["rows"]
    assert row["modes"]["rot"]["share_closed"]["values"] == pytest.approx([0.5, 0.75])
    assert row["modes"]["ref"]["share_closed"]["values"] == pytest.approx([0.25, 0.25])
    assert row["share_difference"]["values"] == pytest.approx([0.25, 0.5])
    assert row["share_difference"]["sd"] == pytest.approx(0.1767767, rel=1e-6)
    line = gap.markdown(table, ["rot"]).splitlines()[-1]
    assert line == "| wanda 50% | 2 | 11.00 ± 1.41 | 41.0 ± 15.6 | 21.0 ± 1.4 | 62 ± 18 % |"


def test_a_run_measured_twice_is_refused(tmp_path: Path) -> None:
    gap = _gap_table()
    runs = [(0, "dense", "", 10.0), (0, "plain", "wanda", 30.0), (0, "rot", "wanda", 20.0)]
    with pytest.raises(SystemExit, match="in both"):
        gap.load_runs([_report(tmp_path / "a.json", runs), _report(tmp_path / "b.json", runs)])


def test_a_remeasured_run_replaces_the_earlier_one_with_latest_and_seeds_filter(tmp_path: Path) -> None:
    gap = _gap_table()
    old = _report(tmp_path / "a.json", [(0, "dense", "", 10.0), (0, "plain", "wanda", 30.0),
                                        (0, "rot", "wanda", 20.0), (1, "dense", "", 10.0),
                                        (1, "plain", "wanda", 30.0), (1, "rot", "wanda", 25.0)])  # fmt: skip
    new = _report(tmp_path / "b.json", [(0, "rot", "wanda", 15.0), (0, "rot+swaps", "wanda", 12.0)])
    runs = gap.load_runs([old, new], latest=True, seeds=[0])
    assert {r["seed"] for r in runs} == {0}
    (row,) = gap.gap_table(runs, ("rot+swaps", "rot"))["rows"]
    assert row["modes"]["rot"]["share_closed"]["values"] == pytest.approx([0.75])  # the newer run
    assert row["modes"]["rot+swaps"]["share_closed"]["values"] == pytest.approx([0.9])
    assert row["share_difference"]["values"] == pytest.approx([0.15])
