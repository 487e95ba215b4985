"""Offline compute nodes: every hub download is a local rule's, compute jobs read local copies.

The hubs are unreachable here, so the download functions are exercised with the hub clients
monkeypatched (`huggingface_hub.hf_hub_download` / `snapshot_download`, `datasets.load_dataset`)
writing files in the hub's layout; what is checked is that the copy lands where the compute side
reads it and that the compute side then works from it alone. Claims:

* fetch_dataset("c4"|"wikitext2"|"lm-eval") asks the hub for the protocol's files/tasks and
  writes the layouts `c4-local:DIR`, `wikitext2-local:DIR` and lm-eval task YAMLs read;
* a missing copy fails in one line naming the path and the rule that fetches it; hub sources
  refuse to start when the hub is offline, before any download is tried;
* `offline()` makes huggingface_hub and datasets offline, and refuses to run too late;
* the paper config resolves every hub name to a local copy and `fetch_all` lists them all.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from denoiserotator.files import assets
from denoiserotator.files.text import (
    C4_TRAIN_FILE,
    C4_VALIDATION_FILE,
    MissingAssetError,
    calibration_documents,
    perplexity_text,
)
from denoiserotator.plan.experiment import Experiment
from tests.conftest import ROOT
from tests.plan.test_experiment import load

HINT = "run the fetch_dataset rule on a machine with internet"


def _write_c4_shard(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text, "url": "u", "timestamp": "t"}) + "\n")


def test_fetch_c4_writes_the_c4_local_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []

    def fake_download(repo_id: str, filename: str, *, repo_type: str, local_dir: Path) -> str:
        calls.append((repo_id, filename, repo_type))
        target = Path(local_dir) / filename  # what hf_hub_download(local_dir=...) does
        _write_c4_shard(target, [f"{filename} document {i}" for i in range(3)])
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    folder = assets.fetch_dataset("c4", tmp_path / "datasets" / "c4")
    assert calls == [("allenai/c4", C4_TRAIN_FILE, "dataset"), ("allenai/c4", C4_VALIDATION_FILE, "dataset")]
    assert calibration_documents(f"c4-local:{folder}") == [f"{C4_TRAIN_FILE} document {i}" for i in range(3)]
    text, meta = perplexity_text(f"c4-local:{folder}")
    assert text.startswith(f"{C4_VALIDATION_FILE} document 0") and meta["documents"] == 3
    # idempotent: a complete copy is not fetched again
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)
    assert assets.fetch_dataset("c4", folder) == folder


def test_fetch_wikitext2_writes_the_hub_parquet_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen = {}

    def fake_snapshot(repo_id: str, *, repo_type: str, allow_patterns: list[str], local_dir: Path) -> str:
        seen.update(repo_id=repo_id, repo_type=repo_type, allow_patterns=allow_patterns)
        for split in ("train", "validation", "test"):
            path = Path(local_dir) / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": [f" = {split} = \n", "", f" {split} line \n"]}), path)
        (Path(local_dir) / ".cache").mkdir()  # the hub client's bookkeeping
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    folder = assets.fetch_dataset("wikitext2", tmp_path / "wikitext2")
    assert seen == {"repo_id": "Salesforce/wikitext", "repo_type": "dataset",
                    "allow_patterns": ["wikitext-2-raw-v1/*"]}  # fmt: skip
    assert not (folder / ".cache").exists()
    text, meta = perplexity_text(f"wikitext2-local:{folder}")
    assert text == " = test = \n\n\n\n\n test line \n" and meta["documents"] == 3
    assert calibration_documents(f"wikitext2-local:{folder}") == [" = train = \n", " train line \n"]


def test_fetch_lm_eval_tasks_then_evaluate_from_the_copy_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from denoiserotator.evaluate.zeroshot import zeroshot
    from denoiserotator.testing import tiny_model, tiny_tokenizer
    from tests.files.test_text import fake_corpus

    # items in each task's hub schema (the fixtures builder writes exactly those schemas)
    corpus = fake_corpus(tmp_path / "corpus")
    fixtures = assets.build_zeroshot_fixtures(corpus, tmp_path / "fx", items_per_task=6)
    requested = []

    def fake_load_dataset(path: str, name: str | None = None, *, split: str, **kwargs) -> datasets.Dataset:
        requested.append((path, name, split))
        key = name if path == "allenai/ai2_arc" else path
        task = {"baber/piqa": "piqa", "allenai/winogrande": "winogrande", "Rowan/hellaswag": "hellaswag",
                "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[key]  # fmt: skip
        return datasets.Dataset.from_list(assets.read_jsonl(fixtures / "data" / f"{task}.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    copy = assets.fetch_dataset("lm-eval", tmp_path / "datasets" / "lm-eval")
    # lm-eval's own dataset names and evaluation splits, read from its installed YAMLs
    assert sorted(requested) == sorted([("baber/piqa", None, "validation"),
                                        ("allenai/winogrande", "winogrande_xl", "validation"),
                                        ("Rowan/hellaswag", None, "validation"),
                                        ("allenai/ai2_arc", "ARC-Easy", "test"),
                                        ("allenai/ai2_arc", "ARC-Challenge", "test")])  # fmt: skip
    parquet = sorted(p.name for p in (copy / "data").iterdir())
    assert parquet == [f"{t}.parquet" for t in sorted(assets.ZEROSHOT_TASKS)]
    monkeypatch.undo()  # evaluation must not need the hub client at all
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = zeroshot(tiny_model("llama"), tiny_tokenizer(), ["piqa", "arc_challenge"], limit=3, batch_size=2,
                      task_dir=copy, fetch_rule="fetch_dataset")  # fmt: skip
    assert result["task_source"] == "hub (local copy)"
    assert result["tasks"]["piqa"]["n"] == 3
    assert result["tasks"]["arc_challenge"]["lm_eval_task"] == "local_arc_challenge"


def test_missing_copies_fail_naming_path_and_rule(tmp_path: Path) -> None:
    with pytest.raises(MissingAssetError) as err:
        calibration_documents(f"c4-local:{tmp_path}")
    assert str(err.value) == f"missing {tmp_path / C4_TRAIN_FILE}: {HINT}"
    with pytest.raises(MissingAssetError, match=f"missing .*{C4_VALIDATION_FILE}: {HINT}"):
        perplexity_text(f"c4-local:{tmp_path}")
    with pytest.raises(MissingAssetError) as err:
        perplexity_text(f"wikitext2-local:{tmp_path}")
    assert str(err.value) == f"missing {tmp_path / 'wikitext-2-raw-v1' / 'test-*.parquet'}: {HINT}"


def test_zeroshot_without_its_task_copy_names_the_rule(tmp_path: Path) -> None:
    from denoiserotator.evaluate.zeroshot import zeroshot

    with pytest.raises(MissingAssetError) as err:
        zeroshot(None, None, ["piqa"], task_dir=tmp_path / "lm-eval", fetch_rule="fetch_dataset")
    assert str(err.value) == f"missing {tmp_path / 'lm-eval' / 'local_piqa.yaml'}: {HINT}"


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_hub_sources_refuse_an_offline_hub(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingAssetError, match=f"needs the hub, which is offline here: use {source}-local:"):
        calibration_documents(source)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_offline_switches_the_hub_libraries_offline() -> None:
    proc = _python(
        "from denoiserotator.logs import offline; offline()\n"
        "import huggingface_hub.constants as h, datasets.config as d\n"
        "print(h.HF_HUB_OFFLINE, d.HF_DATASETS_OFFLINE)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
    # without it (the fetch rules) they stay online: the check above can fail
    online = _python("import huggingface_hub.constants as h; print(h.HF_HUB_OFFLINE)")
    assert online.stdout.split() == ["False"]


def test_offline_refuses_to_run_after_a_hub_import() -> None:
    proc = _python("import huggingface_hub\nfrom denoiserotator.logs import offline\noffline()")
    assert proc.returncode != 0 and "offline() after ['huggingface_hub'] were imported" in proc.stderr


def test_paper_config_reads_only_local_copies() -> None:
    exp = Experiment(load("config.yaml"))
    assert exp.resolve_source("c4") == "c4-local:resources/datasets/c4"
    assert exp.resolve_source("wikitext2") == "wikitext2-local:resources/datasets/wikitext2"
    assert exp.resolve_source("json:x.jsonl") == "json:x.jsonl"
    assert exp.zeroshot_task_dir() == "resources/datasets/lm-eval"
    assert exp.fetch_targets() == sorted(
        [f"resources/models/{slug}" for slug in exp.models]
        + ["resources/datasets/c4", "resources/datasets/wikitext2", "resources/datasets/lm-eval"]
    )
    demo = Experiment(load("demo.yaml"))
    assert demo.fetch_targets() == sorted(
        ["resources/models/smollm2-135m", "resources/corpus", demo.fixtures_dir()]
    )
