"""lm-eval zero-shot over local fixtures: the documented structure, and values recomputed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from denoiserotator.assets import build_zeroshot_fixtures
from denoiserotator.evaluate import zeroshot as zeroshot_module
from denoiserotator.evaluate.zeroshot import METRICS, TASKS, zeroshot
from denoiserotator.testing import save_tiny_model, tiny_model, tiny_tokenizer

from .test_data import fake_corpus

LIMIT = 4


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zeroshot")
    return build_zeroshot_fixtures(fake_corpus(root / "corpus"), root / "tasks", items_per_task=12, seed=0)


@pytest.fixture(scope="module")
def result(task_dir: Path) -> dict:
    torch.manual_seed(0)
    return zeroshot(
        tiny_model("llama", seed=2),
        tiny_tokenizer(),
        list(TASKS),
        limit=LIMIT,
        batch_size=3,
        task_dir=task_dir,
        log_samples=True,
    )


def loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), split the way a causal LM scorer must split."""
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(n_context, len(whole))))


def test_structure(result: dict, task_dir: Path) -> None:
    assert set(result["tasks"]) == set(TASKS)
    for task, row in result["tasks"].items():
        assert row["metric"] == METRICS[task] and row["n"] == LIMIT and row["lm_eval_task"] == f"local_{task}"
        assert 0.0 <= row["value"] <= 1.0 and row["version"] is not None
        # The value is lm-eval's aggregate of its own per-item metric.
        per_item = [s[row["metric"]] for s in result["samples"][task]]
        assert len(per_item) == LIMIT and row["value"] == pytest.approx(float(np.mean(per_item)))
    assert result["zeroshot_avg"] == pytest.approx(np.mean([r["value"] for r in result["tasks"].values()]))
    assert result["num_fewshot"] == 0 and result["limit"] == LIMIT and result["lm_eval_version"] == "0.4.13"
    assert result["task_dir"] == str(task_dir)


def test_stderr_is_lm_evals_and_the_average_combines_them(result: dict) -> None:
    """Claim: each task's stderr is the per-item scores' sample sd / sqrt(n) (lm-eval's), and
    zeroshot_avg_stderr = sqrt(Σ se_i²) / k."""
    for task, row in result["tasks"].items():
        per_item = np.array([s[row["metric"]] for s in result["samples"][task]], dtype=float)
        assert row["stderr"] == pytest.approx(per_item.std(ddof=1) / np.sqrt(len(per_item)))
    stderrs = np.array([r["stderr"] for r in result["tasks"].values()])
    assert result["zeroshot_avg_stderr"] == pytest.approx(np.sqrt((stderrs**2).sum()) / len(stderrs))


def test_piqa_acc_norm_by_hand(result: dict) -> None:
    model, tokenizer = tiny_model("llama", seed=2), tiny_tokenizer()
    correct = []
    for sample in result["samples"]["piqa"]:
        doc = sample["doc"]
        context = f"Question: {doc['goal']}\nAnswer:"
        choices = [doc["sol1"], doc["sol2"]]
        assert [tuple(a) for a in sample["arguments"]] == [(context, " " + c) for c in choices]
        lls = np.array([loglikelihood(model, tokenizer, context, " " + c) for c in choices])
        assert lls == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-3)
        correct.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == doc["label"]))
    assert result["tasks"]["piqa"]["value"] == pytest.approx(np.mean(correct))


def test_winogrande_acc_by_hand(result: dict) -> None:
    model, tokenizer = tiny_model("llama", seed=2), tiny_tokenizer()
    correct = []
    for sample in result["samples"]["winogrande"]:
        doc = sample["doc"]
        blank = doc["sentence"].index("_")
        target = " " + doc["sentence"][blank + 1 :].strip()
        lls = [
            loglikelihood(model, tokenizer, doc["sentence"][:blank] + option, target)
            for option in (doc["option1"], doc["option2"])
        ]
        correct.append(float(int(np.argmax(lls)) == int(doc["answer"]) - 1))
    assert result["tasks"]["winogrande"]["value"] == pytest.approx(np.mean(correct))


def test_zeroshot_cli(tmp_path: Path, task_dir: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "model", seed=2)
    out = tmp_path / "zs.json"
    zeroshot_module.main(
        [
            "--model",
            str(model_dir),
            "--tasks",
            "arc_easy",
            "winogrande",
            "--task-dir",
            str(task_dir),
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert list(saved["tasks"]) == ["arc_easy", "winogrande"] and saved["model"] == str(model_dir)
    assert saved["tasks"]["arc_easy"]["n"] == 3 and "samples" not in saved


def test_unknown_task_and_missing_fixture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown"):
        zeroshot(tiny_model("llama"), tiny_tokenizer(), ["boolq"], limit=1, batch_size=1, task_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        zeroshot(tiny_model("llama"), tiny_tokenizer(), ["piqa"], limit=1, batch_size=1, task_dir=tmp_path)


def test_stale_fixture_paths_fail_clearly(tmp_path: Path, task_dir: Path) -> None:
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(task_dir, moved)
    (moved / "data" / "piqa.jsonl").unlink()
    text = (moved / "local_piqa.yaml").read_text().replace(str(task_dir), str(moved))
    (moved / "local_piqa.yaml").write_text(text)
    with pytest.raises(FileNotFoundError, match="rebuild"):
        zeroshot(tiny_model("llama"), tiny_tokenizer(), ["piqa"], limit=1, batch_size=1, task_dir=moved)
