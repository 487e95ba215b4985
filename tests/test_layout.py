"""The package's layout: the method imports neither the plan nor the test helpers, and the stage
CLIs stay where users call them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src/denoiserotator"
FORBIDDEN_FOR_THE_METHOD = ("denoiserotator.plan", "denoiserotator.testing", "denoiserotator.tables")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "method").rglob("*.py")), ids=lambda p: p.name)
def test_the_method_imports_neither_the_plan_nor_the_test_helpers(path: Path) -> None:
    bad = {name for name in _imports(path) if name.startswith(FORBIDDEN_FOR_THE_METHOD)}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_the_plan_does_not_import_the_test_helpers() -> None:
    for path in sorted((PACKAGE / "plan").rglob("*.py")):
        assert not any(n.startswith("denoiserotator.testing") for n in _imports(path)), path


@pytest.mark.parametrize(
    "stage",
    ["calibrate", "prune", "finetune", "evaluate.perplexity", "evaluate.zeroshot", "tables", "plan"],
)
def test_every_stage_cli_answers_help(stage: str) -> None:
    result = subprocess.run([sys.executable, "-m", f"denoiserotator.{stage}", "--help"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_the_rules_stay_thin() -> None:
    """The grid, ids and requests live in the package: the rules' shared file stays short."""
    common = PACKAGE.parents[1] / "workflow/rules/common.smk"
    assert len(common.read_text().splitlines()) < 150
