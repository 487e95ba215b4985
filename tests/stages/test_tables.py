"""tables.py: row assembly, paper lookup, the rotation-only == dense check, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from denoiserotator.evaluate.uncertainty import mean_stderr
from denoiserotator.tables import (
    build_tables,
    collect,
    load_paper_results,
    paper_row,
    plot_perplexity,
    plot_zeroshot,
    to_markdown,
)


def _write(path: Path, payload: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return str(path)


def _row(
    tmp: Path,
    name: str,
    pruner: str,
    pattern: str,
    rotation: str,
    ppl: float,
    sparsity: float,
    acc: dict[str, float],
    finetune: str = "none",
    entropy: tuple[float, float] | None = None,
    stderr: dict[str, float] | None = None,
    nll_stderr: float | None = None,
) -> dict:
    """A manifest row whose result files look like the stages' (lm-eval's stderr per task when
    `stderr` is given; a perplexity interval exp(log ppl ± nll_stderr) when that is given)."""
    base = tmp / name
    ppl_result = {"ppl": ppl}
    if nll_stderr is not None:
        ppl_result |= {"nll_stderr": nll_stderr, "ppl_low": ppl * math.exp(-nll_stderr),
                       "ppl_high": ppl * math.exp(nll_stderr)}  # fmt: skip
    files = {
        "sparsity": _write(base / "sparsity.json", {"overall": sparsity}),
        "ppl": {"wikitext2": _write(base / "ppl.json", ppl_result)},
        "zeroshot": _write(
            base / "zs.json",
            {
                "tasks": {t: {"value": v, "stderr": (stderr or {}).get(t)} for t, v in acc.items()},
                "zeroshot_avg": sum(acc.values()) / len(acc),
            },
        ),
        "stats": None,
    }
    if entropy is not None:
        files["stats"] = _write(
            base / "stats.json",
            {
                "seconds": 3.0,
                "layers": [
                    {"layer": 0, "entropy_before": entropy[0], "entropy_after": entropy[1],
                     "rotation_steps": 40, "rotation_best_step": 38, "seconds": 1.5},
                    {"layer": 1, "entropy_before": entropy[0] + 2, "entropy_after": entropy[1] + 2,
                     "rotation_steps": 60, "rotation_best_step": 60, "seconds": 1.3},
                ],
            },
        )
    return {
        "model": "llama3-8b",
        "pruner": pruner,
        "pattern": pattern,
        "rotation": rotation,
        "finetune": finetune,
        "paper_name": "LLaMA-3-8B",
        "row": name,
        "files": files,
    }


def _manifest(tmp: Path, rotation_only_ppl: float) -> dict:
    acc = {"piqa": 0.8, "winogrande": 0.7}
    rows = [
        _row(tmp, "dense", "none", "dense", "none", 6.0, 0.0, acc),
        _row(tmp, "w24", "wanda", "2:4", "none", 25.0, 0.5, acc),
        _row(tmp, "w24dr", "wanda", "2:4", "denoise", 11.0, 0.5, acc, entropy=(5.0, 4.0)),
        _row(tmp, "rot", "none", "dense", "denoise", rotation_only_ppl, 0.0, acc, entropy=(5.0, 4.5)),
        _row(tmp, "w24dr-lora", "wanda", "2:4", "denoise", 10.0, 0.5, acc, finetune="lora"),
    ]
    wt2 = {"dataset": "wikitext2", "seqlen": 2048, "max_windows": None, "paper": "wt2", "note": None}
    ppl = {"wikitext2": wt2}
    return {
        "rows": rows,
        "perplexity": ppl,
        "zeroshot": {"tasks": ["piqa", "winogrande"], "source": "hub", "limit": None},
        "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0},
        "rotation": {"steps": 2000, "lr": 0.01, "loss_variant": "paper"},
        "finetune": None,
    }


def test_paper_lookup_matches_the_papers_rows() -> None:
    paper = load_paper_results()
    row = paper_row(paper, "LLaMA-3-8B", "wanda", "2:4", "denoise", "none")
    assert (row["wt2"], row["c4"], row["avg"]) == (11.411, 17.657, 64.22)
    assert paper_row(paper, "LLaMA-3-8B", "wanda", "2:4", "none", "none")["wt2"] == 25.189
    assert paper_row(paper, "LLaMA-3-8B", "none", "dense", "none", "none")["wt2"] == 6.138
    # no paper value for rows the paper does not have
    assert paper_row(paper, "LLaMA-3-8B", "none", "dense", "denoise", "none") is None
    assert paper_row(paper, "LLaMA-3-8B", "wanda", "2:4", "denoise", "lora") is None
    assert paper_row(paper, None, "wanda", "2:4", "denoise", "none") is None


def test_collect_columns_values_and_paper(tmp_path: Path) -> None:
    table = collect(_manifest(tmp_path, rotation_only_ppl=6.0))
    assert list(table.columns[:19]) == [
        "model",
        "pruner",
        "pattern",
        "rotation",
        "refine",
        "finetune",
        "measured_sparsity",
        "ppl_wikitext2",
        "ppl_wikitext2_nll_stderr",
        "ppl_wikitext2_low",
        "ppl_wikitext2_high",
        "piqa",
        "winogrande",
        "piqa_stderr",
        "winogrande_stderr",
        "zeroshot_avg",
        "zeroshot_avg_stderr",
        "entropy_before",
        "entropy_after",
    ]
    assert len(table) == 5
    plain = table.finetune == "none"
    w24dr = table[(table.pruner == "wanda") & (table.rotation == "denoise") & plain].iloc[0]
    assert w24dr.ppl_wikitext2 == 11.0 and w24dr.measured_sparsity == 0.5
    assert w24dr.paper_ppl_wikitext2 == 11.411
    assert w24dr.paper_piqa == pytest.approx(0.741) and w24dr.paper_winogrande == pytest.approx(0.6882)
    assert w24dr.paper_zeroshot_avg == pytest.approx(0.6422)
    assert w24dr.entropy_before == 6.0 and w24dr.entropy_after == 5.0  # means over the two layers
    assert w24dr.zeroshot_avg == pytest.approx(0.75)
    lora = table[table.finetune == "lora"].iloc[0]
    assert pd.isna(lora.paper_ppl_wikitext2)


@pytest.mark.parametrize("ppl, expected", [(6.0, True), (6.0 * (1 + 5e-4), True), (6.0 * 1.01, False)])
def test_rotation_only_row_is_checked_against_dense(tmp_path: Path, ppl: float, expected: bool) -> None:
    table = collect(_manifest(tmp_path, rotation_only_ppl=ppl))
    check = table["rotation_only_matches_dense"]
    rot = (table.pruner == "none") & (table.rotation == "denoise")
    assert check[rot].tolist() == [expected]
    assert check[~rot].isna().all()


def test_build_tables_writes_every_output(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "r", rotation_only_ppl=6.0)
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    out = tmp_path / "tables"
    table = build_tables(
        tmp_path / "m.json",
        out / "main.csv",
        out / "main.parquet",
        out / "main.md",
        out / "ppl.png",
        out / "entropy.png",
    )
    pd.testing.assert_frame_equal(pd.read_parquet(out / "main.parquet"), table)
    csv = pd.read_csv(out / "main.csv")
    assert csv.shape == table.shape
    for png in ("ppl.png", "entropy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "main.md").read_text()
    # Settings sections are rendered field by field (cc0b89f); this assertion predates that.
    assert "- calibration: source c4, nsamples 128, seqlen 2048" in text and "- rotation: steps 2000," in text
    assert text.count("| llama3-8b |") == 5
    assert to_markdown(table, manifest) == text
    # the rotated rows' per-layer lines, as the prune job logged them, and the steps spent
    rotated = [row for row in manifest["rows"] if row["rotation"] == "denoise" and row["files"]["stats"]]
    assert rotated and text.count("## Rotation per layer") == 1
    layers = json.loads(Path(rotated[0]["files"]["stats"]).read_text())["layers"]
    assert f"layer 2/2: loss {layers[1]['entropy_before']:.4g} → " in text
    assert "60 steps (best at 60), 1.3 s" in text
    assert set(table.loc[table["rotation"] == "denoise", "rotation_steps_mean"].dropna()) == {50.0}


# -- uncertainty ---------------------------------------------------------------------------------

SE = {"piqa": 0.03, "winogrande": 0.04}  # lm-eval-style standard errors: avg se = 0.025


def _noise_manifest(tmp: Path, rotated_acc: float, plain_acc: float) -> dict:
    """Dense, Wanda 2:4 plain and rotated (both at the given accuracy on both tasks), LoRA rotated
    without a plain LoRA counterpart; every row with stderrs SE and a perplexity interval."""
    manifest = _manifest(tmp, rotation_only_ppl=6.0)
    acc = {"piqa": 0.8, "winogrande": 0.7}
    flat = {"piqa": plain_acc, "winogrande": plain_acc}
    rot = {"piqa": rotated_acc, "winogrande": rotated_acc}
    manifest["rows"] = [
        _row(tmp, "dense", "none", "dense", "none", 6.0, 0.0, acc, stderr=SE, nll_stderr=0.01),
        _row(tmp, "w24", "wanda", "2:4", "none", 25.0, 0.5, flat, stderr=SE, nll_stderr=0.05),
        _row(tmp, "w24dr", "wanda", "2:4", "denoise", 11.0, 0.5, rot, stderr=SE, nll_stderr=0.02),
        _row(tmp, "w24dr-lora", "wanda", "2:4", "denoise", 10.0, 0.5, rot, "lora", stderr=SE),
    ]
    return manifest


def test_stderr_columns_reach_main_csv(tmp_path: Path) -> None:
    """Claim: lm-eval's per-task stderrs and the perplexity interval from the result JSONs arrive
    in main.csv, and zeroshot_avg_stderr = sqrt(Σ se²)/k of them."""
    manifest = _noise_manifest(tmp_path / "r", rotated_acc=0.6, plain_acc=0.6)
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    out = tmp_path / "t"
    build_tables(tmp_path / "m.json", out / "main.csv", out / "main.parquet", out / "main.md",
                 out / "ppl.png", out / "entropy.png", out / "zeroshot.png")  # fmt: skip
    csv = pd.read_csv(out / "main.csv")
    assert csv["piqa_stderr"].tolist() == [0.03] * 4 and csv["winogrande_stderr"].tolist() == [0.04] * 4
    assert csv["zeroshot_avg_stderr"].tolist() == pytest.approx([math.sqrt(0.03**2 + 0.04**2) / 2] * 4)
    assert csv["zeroshot_avg_stderr"][0] == pytest.approx(mean_stderr([0.03, 0.04]))
    w24 = csv[(csv.pruner == "wanda") & (csv.rotation == "none")].iloc[0]
    assert w24.ppl_wikitext2_nll_stderr == 0.05
    assert (w24.ppl_wikitext2_low, w24.ppl_wikitext2_high) == pytest.approx(
        (25 / math.exp(0.05), 25 * math.exp(0.05))
    )
    assert pd.isna(csv[csv.finetune == "lora"].iloc[0].ppl_wikitext2_low)  # no interval in its file
    assert (out / "zeroshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "main.md").read_text()
    assert "| 0.6000 ± 0.0300 |" in text and "| 25 [23.78, 26.28] |" in text
    assert "sqrt(Σ se_i²) / k" in text and "|Δ| < 2·sqrt(se_a² + se_b²)" in text


def test_results_without_stderr_leave_the_columns_empty(tmp_path: Path) -> None:
    """Claim: result files written before stderrs existed give empty (not wrong) uncertainty."""
    table = collect(_manifest(tmp_path, rotation_only_ppl=6.0))
    assert table["piqa_stderr"].isna().all() and table["zeroshot_avg_stderr"].isna().all()
    assert table["ppl_wikitext2_nll_stderr"].isna().all()
    assert table["zeroshot_avg_within_noise"].isna().all()  # no errors, no verdict
    assert table["zeroshot_avg_delta"].notna().sum() == 2  # rotated Wanda 2:4 and rotation-only


@pytest.mark.parametrize(
    "rotated, plain, expected",
    [
        (0.62, 0.56, True),  # Δ 0.06 < 2·sqrt(2)·0.025 = 0.0707
        (0.64, 0.56, False),  # Δ 0.08 > 0.0707
        (0.48, 0.56, False),  # worse by as much: same verdict
    ],
)
def test_noise_flag_both_ways(tmp_path: Path, rotated: float, plain: float, expected: bool) -> None:
    """Claim: a rotated row is within noise of its plain counterpart exactly when
    |Δ| < 2·sqrt(se_a² + se_b²); rows without a plain counterpart (LoRA here) and plain rows get
    no verdict; main.md says which."""
    manifest = _noise_manifest(tmp_path, rotated_acc=rotated, plain_acc=plain)
    table = collect(manifest)
    rotated_row = (table.rotation == "denoise") & (table.finetune == "none")
    assert table.loc[rotated_row, "zeroshot_avg_delta"].tolist() == pytest.approx([rotated - plain])
    assert table.loc[rotated_row, "zeroshot_avg_within_noise"].tolist() == [expected]
    assert table.loc[~rotated_row, "zeroshot_avg_within_noise"].isna().all()
    text = to_markdown(table, manifest)
    verdict = "within noise" if expected else "beyond noise"
    (line,) = [row for row in text.splitlines() if "| wanda | 2:4 | denoise | none | none |" in row]
    assert f"| {rotated - plain:+.4f} | {verdict} |" in line


def _error_bars(ax) -> list[list[tuple[float, float]]]:
    """(bottom, top) of each error bar drawn with each bar series of an Axes (NaN for a bar that
    is missing, whose segment matplotlib leaves empty)."""
    spans = []
    for container in ax.containers:
        if getattr(container, "errorbar", None) is None:
            continue
        _, _, (segments,) = container.errorbar.lines
        spans.append([(float(seg[0][1]), float(seg[1][1])) if len(seg) else (math.nan, math.nan)
                      for seg in segments.get_segments()])  # fmt: skip
    return spans


def test_plots_draw_error_bars_of_the_standard_errors(tmp_path: Path) -> None:
    """Claim: zeroshot.png has ±1 se bars (percent) on every bar; ppl.png bars span
    [exp(nll - se), exp(nll + se)]."""
    table = collect(_noise_manifest(tmp_path / "r", rotated_acc=0.62, plain_acc=0.56))
    fig = plot_zeroshot(table, tmp_path / "zs.png")
    plain, rotated = _error_bars(fig.axes[0])
    se = 100 * mean_stderr([0.03, 0.04])
    # groups: dense, wanda 2:4, wanda 2:4 + lora; plain has no LoRA row, rotated no dense row
    assert plain[0] == pytest.approx((75 - se, 75 + se)) and plain[1] == pytest.approx((56 - se, 56 + se))
    assert rotated[1] == pytest.approx((62 - se, 62 + se)) and rotated[2] == pytest.approx((62 - se, 62 + se))
    assert "≈" in [t.get_text() for t in fig.axes[0].texts]  # 0.06 is within noise
    without_dense = table.assign(zeroshot_avg=table.zeroshot_avg.where(table.pruner != "none"))
    fig = plot_zeroshot(without_dense, tmp_path / "zs2.png")  # a row without zero-shot: no slot
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["wanda\n2:4", "wanda\n2:4\n+lora"]
    fig = plot_perplexity(table, ["wikitext2"], tmp_path / "ppl.png")
    plain, rotated = _error_bars(fig.axes[0])
    assert plain[0] == pytest.approx((25 * math.exp(-0.05), 25 * math.exp(0.05)))
    assert rotated[0] == pytest.approx((11 * math.exp(-0.02), 11 * math.exp(0.02)))


def test_every_main_csv_column_is_in_the_readme_glossary(tmp_path: Path) -> None:
    """The README's glossary names every column `collect` writes (with <set> and <task> standing
    for the configured sets and tasks), so a new column cannot land undocumented."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("**`main.csv`, column by column**")
    glossary = readme[start : readme.index("\n\n", readme.index("| column | meaning |", start))]
    names = set(re.findall(r"`([^`]+)`", glossary))
    manifest = _manifest(tmp_path, rotation_only_ppl=6.0)
    table = collect(manifest)
    sets, tasks = list(manifest["perplexity"]), manifest["zeroshot"]["tasks"]

    def documented(column: str) -> bool:
        generic = {column}
        for name in sets:
            generic.add(column.replace(f"ppl_{name}", "ppl_<set>"))
        for task in tasks:
            generic.add(re.sub(rf"(^|_){task}($|_)", r"\1<task>\2", column))
        return bool(generic & names)

    missing = [column for column in table.columns if not documented(column)]
    assert not missing, f"main.csv columns missing from the README glossary: {missing}"
