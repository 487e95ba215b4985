"""lm-eval zero-shot over local fixtures: the documented structure, and values recomputed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from denoiserotator.evaluate import zeroshot as zeroshot_module
from denoiserotator.evaluate.zeroshot import METRICS, TASKS, zeroshot
from denoiserotator.files.assets import build_zeroshot_fixtures
from denoiserotator.testing import save_tiny_model, tiny_model, tiny_tokenizer
from tests.files.test_text import fake_corpus

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


class _Properties:
    def __init__(self, total_memory: int) -> None:
        self.total_memory = total_memory


class _Stop(Exception):
    pass


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, totals: list[int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(totals))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Properties(totals[i]))


@pytest.mark.parametrize(("fraction", "expect_split"), [(2.0, False), (0.6, True)])
def test_zeroshot_stage_splits_a_model_that_does_not_fit_one_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraction: float, expect_split: bool
) -> None:
    """Claim: on CUDA, a model larger than one GPU (less the reserve) is loaded with accelerate's
    device_map="auto" and max_memory = each visible GPU's memory less the reserve, and that loaded
    model is what HFLM gets (with the batch size); a model that fits goes whole on the device.
    (No GPU here: torch.cuda's queries, load_model and HFLM are stand-ins that record their calls.)"""
    import lm_eval.models.huggingface as hf

    from denoiserotator.evaluate import zeroshot as zs
    from denoiserotator.files import export
    from denoiserotator.plan import costs
    from denoiserotator.settings import ComputeSettings, ZeroshotSettings

    folder = save_tiny_model("llama", tmp_path / "m")
    weights = export.folder_parameter_count(folder) * 2  # bfloat16
    reserve = 1000
    monkeypatch.setattr(costs, "EVAL_GPU_RESERVE_GIB", reserve / 2**30)
    total = int(weights * fraction) + reserve
    _fake_gpus(monkeypatch, [total, total])
    loaded: dict = {}
    model = tiny_model("llama")

    def fake_load(path, dtype, device, max_memory=None):
        loaded.update(path=path, dtype=dtype, device=device, max_memory=max_memory)
        return model, tiny_tokenizer()

    built: dict = {}

    def fake_hflm(**kwargs):
        built.update(kwargs)
        raise _Stop

    monkeypatch.setattr(export, "load_model", fake_load)
    monkeypatch.setattr(hf, "HFLM", fake_hflm)
    with pytest.raises(_Stop):
        zs.zeroshot_stage(folder, tmp_path / "out.json", ZeroshotSettings(tasks=("piqa",), batch_size=3),
                          ComputeSettings(device="cuda", dtype="bfloat16"))  # fmt: skip
    assert loaded["dtype"] == torch.bfloat16 and loaded["device"] == "cuda"
    if expect_split:
        assert loaded["max_memory"] == {0: total - reserve, 1: total - reserve}
    else:
        assert loaded["max_memory"] is None
    assert built["pretrained"] is model and built["batch_size"] == 3 and "parallelize" not in built


def test_zeroshot_stage_refuses_too_few_gpus_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: when the visible GPUs together are too small, the stage says so before loading."""
    from denoiserotator.evaluate import zeroshot as zs
    from denoiserotator.files import export
    from denoiserotator.plan import costs
    from denoiserotator.settings import ComputeSettings, ZeroshotSettings

    folder = save_tiny_model("llama", tmp_path / "m")
    weights = export.folder_parameter_count(folder) * 4
    monkeypatch.setattr(costs, "EVAL_GPU_RESERVE_GIB", 0.0)
    _fake_gpus(monkeypatch, [weights // 3, weights // 3])
    monkeypatch.setattr(export, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(RuntimeError, match="do not fit the 2 visible GPU"):
        zs.zeroshot_stage(folder, tmp_path / "out.json", ZeroshotSettings(tasks=("piqa",)),
                          ComputeSettings(device="cuda"))  # fmt: skip


def test_placement_agrees_with_the_gpu_request() -> None:
    """Claim: the GPUs costs.gpus_for_weights requests are enough for the stage's placement and one
    fewer is not (same reserve), for the grid's largest models (70B/72B bf16, 32B fp32)."""
    from denoiserotator.evaluate.zeroshot import placement
    from denoiserotator.plan import costs

    gpu = int(costs.GPU_MEMORY_GIB * 2**30)
    reserve = costs.EVAL_GPU_RESERVE_GIB * 2**30
    for weights in (70.6e9 * 2, 72.7e9 * 2, 32.8e9 * 4, 8e9 * 4):
        n = costs.gpus_for_weights(weights)
        assert (placement(weights, "cuda", [gpu] * n, reserve) is None) == (n == 1)
        if n > 1:
            with pytest.raises(RuntimeError):
                placement(weights, "cuda", [gpu] * (n - 1), reserve)
    assert placement(1e12, "cpu", [gpu], reserve) is None  # CPU runs are never split


def test_load_model_with_max_memory_dispatches_with_accelerate(tmp_path: Path) -> None:
    """Claim: load_model's max_memory path (device_map="auto") loads a rotated folder strictly, with
    its boundary rotations (here onto the CPU, the one device there is: a split over GPUs needs GPUs)."""
    from denoiserotator.evaluate.perplexity import perplexity
    from denoiserotator.files.export import load_model, save_model

    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    save_model(tiny_model("qwen2"), tiny_tokenizer(), tmp_path / "m", boundary=[q, None])
    plain, _ = load_model(tmp_path / "m")
    mapped, _ = load_model(tmp_path / "m", max_memory={"cpu": 10**9})
    assert all(p.device.type == "cpu" for p in mapped.parameters())
    ids = torch.randint(3, 384, (48,), generator=torch.Generator().manual_seed(1))
    assert perplexity(mapped, ids, 16)["nll"] == pytest.approx(perplexity(plain, ids, 16)["nll"], rel=1e-6)
