"""Setup every study shares: the repository root, the `--out` option, and writing the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def study_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the option every study has: `--out`, where the JSON report goes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    return parser


def write_report(report: Any, out: Path | None, echo: bool = True) -> str:
    """The report as indented JSON: printed (with `echo`) and, given `out`, written there
    atomically (a killed study leaves the previous report whole)."""
    text = json.dumps(report, indent=2, default=str)
    if echo:
        print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(text + "\n")
        partial.replace(out)
    return text
