"""tables.py: row assembly, paper lookup, the rotation-only == dense check, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from denoiserotator.tables import build_tables, collect, load_paper_results, paper_row, to_markdown


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
) -> dict:
    base = tmp / name
    files = {
        "sparsity": _write(base / "sparsity.json", {"overall": sparsity}),
        "ppl": {"wikitext2": _write(base / "ppl.json", {"ppl": ppl})},
        "zeroshot": _write(
            base / "zs.json",
            {
                "tasks": {t: {"value": v} for t, v in acc.items()},
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
                    {"layer": 0, "entropy_before": entropy[0], "entropy_after": entropy[1]},
                    {"layer": 1, "entropy_before": entropy[0] + 2, "entropy_after": entropy[1] + 2},
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
    assert list(table.columns[:11]) == [
        "model",
        "pruner",
        "pattern",
        "rotation",
        "finetune",
        "measured_sparsity",
        "ppl_wikitext2",
        "piqa",
        "winogrande",
        "zeroshot_avg",
        "entropy_before",
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
    assert "128 x 2048 tokens from `c4`" in text and "2000 steps per layer" in text
    assert text.count("| llama3-8b |") == 5
    assert to_markdown(table, manifest) == text
