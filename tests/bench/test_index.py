"""bench/README.md indexes every study and every report in bench/results/."""

from __future__ import annotations

import fnmatch
import re

from tests.conftest import ROOT

BENCH = ROOT / "bench"


def _index() -> list[tuple[str, list[str]]]:
    rows = []
    for line in (BENCH / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), re.findall(r"`([^`]+\.json)`", cells[2])))
    return rows


def test_every_study_is_in_the_index() -> None:
    studies = {path.stem for path in BENCH.glob("*.py")} - {"__init__", "common"}
    assert studies == {study for study, _ in _index()}


def test_every_report_belongs_to_an_indexed_study() -> None:
    patterns = [pattern for _, reports in _index() for pattern in reports]
    for report in sorted(BENCH.glob("results/*.json")):
        assert any(fnmatch.fnmatch(report.name, pattern) for pattern in patterns), report.name
