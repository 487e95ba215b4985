"""Calibration and evaluation token streams, from the hub (cluster) or from local files.

Source strings (one vocabulary for calibration and perplexity):

* ``c4``: hub ``allenai/c4``; calibration from ``en/c4-train.00000-of-01024.json.gz``, perplexity from
  ``en/c4-validation.00000-of-00008.json.gz`` (first 1100 documents joined with " ", first
  256 x seqlen tokens).
* ``c4-local:<dir>``: the same two files under ``<dir>/en/`` (same layout as the hub repository).
* ``wikitext2``: hub ``Salesforce/wikitext`` ``wikitext-2-raw-v1``; perplexity on the test split
  joined with "\\n\\n" (calibration uses the train split's lines as documents).
* ``wikitext2-local:<dir>``: parquet (or arrow) files in the hub layout, ``<dir>/wikitext-2-raw-v1/
  test-*.parquet`` (or ``<dir>/test-*.parquet``).
* ``json:<path>``: JSONL with a ``text`` field, one document per line; ``text:<path>``: a plain text
  file whose paragraphs (separated by blank lines) are the documents. For perplexity the
  documents are joined with "\\n\\n".

Calibration follows SPEC §5.1 (the GPTQ/SparseGPT protocol): ``random.Random(seed)`` picks a random
document, retries until it has more than ``seqlen`` tokens, then takes a random window of
``seqlen`` tokens from it. When a local corpus has too few such documents, ``mode="auto"``
switches to the documented variant ``joined``: all documents joined with "\\n\\n", tokenised once,
random windows of that stream. The mode used is recorded in the metadata.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

C4_HUB = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_VALIDATION_DOCS = 1100
C4_VALIDATION_WINDOWS = 256
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
# Below this many documents longer than seqlen, "auto" uses the joined stream (see module doc).
MIN_LONG_DOCUMENTS = 8
# The workflow's local rule that downloads the hub datasets (denoiserotator.files.assets.fetch_dataset).
FETCH_RULE = "fetch_dataset"


class MissingAssetError(FileNotFoundError):
    """A local copy a compute job reads is missing; the message names it and the rule that fetches it."""


def missing(path: str | Path, rule: str = FETCH_RULE) -> MissingAssetError:
    """The one-line error for a missing local copy (compute nodes cannot download it themselves)."""
    return MissingAssetError(f"missing {path}: run the {rule} rule on a machine with internet")


def hub_offline() -> bool:
    """Whether this process must not reach the hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))  # fmt: skip


def _require_hub(source: str, local: str) -> None:
    if hub_offline():
        raise MissingAssetError(f"{source!r} needs the hub, which is offline here: use {local} "
                                f"(fetched by the {FETCH_RULE} rule on a machine with internet)")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# documents


def _read_jsonl_texts(path: Path) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def _read_paragraphs(path: Path) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def _c4_local(folder: Path, file: str) -> list[str]:
    path = Path(folder) / file
    if not path.is_file():
        raise missing(path)
    return _read_jsonl_texts(path)


def _c4_hub(file: str, split: str) -> list[str]:
    _require_hub("c4", "c4-local:<dir>")
    import datasets

    dataset = datasets.load_dataset(C4_HUB, data_files={split: file}, split=split)
    return list(dataset["text"])


def _wikitext_hub(split: str) -> list[str]:
    _require_hub("wikitext2", "wikitext2-local:<dir>")
    import datasets

    return list(datasets.load_dataset(*WIKITEXT_HUB, split=split)["text"])


def _wikitext_local(folder: Path, split: str) -> list[str]:
    folder = Path(folder)
    for base in (folder / WIKITEXT_HUB[1], folder):
        parquet = sorted(base.glob(f"{split}-*.parquet"))
        if parquet:
            import pyarrow.parquet as pq

            return [text for file in parquet
                    for text in pq.read_table(file, columns=["text"])["text"].to_pylist()]
        arrow = sorted(base.glob(f"*{split}*.arrow"))
        if arrow:
            import datasets

            return [text for file in arrow for text in datasets.Dataset.from_file(str(file))["text"]]
    # hub layout expected: <folder>/wikitext-2-raw-v1/<split>-*.parquet (what fetch_dataset writes)
    raise missing(folder / WIKITEXT_HUB[1] / f"{split}-*.parquet")


def _split_source(source: str) -> tuple[str, str | None]:
    kind, _, arg = source.partition(":")
    return kind, (arg or None)


def calibration_documents(source: str) -> list[str]:
    """The documents calibration windows are drawn from."""
    kind, arg = _split_source(source)
    if kind == "c4":
        return _c4_hub(C4_TRAIN_FILE, "train")
    if kind == "c4-local" and arg:
        return _c4_local(Path(arg), C4_TRAIN_FILE)
    if kind == "wikitext2":
        return [t for t in _wikitext_hub("train") if t.strip()]
    if kind == "wikitext2-local" and arg:
        return [t for t in _wikitext_local(Path(arg), "train") if t.strip()]
    if kind == "json" and arg:
        return _read_jsonl_texts(Path(arg))
    if kind == "text" and arg:
        return _read_paragraphs(Path(arg))
    raise ValueError(f"unknown calibration source {source!r}")


def perplexity_text(dataset: str, split: str = "test") -> tuple[str, dict[str, Any]]:
    """The evaluation text of ``dataset`` joined per its protocol, and how it was built."""
    kind, arg = _split_source(dataset)
    if kind in ("wikitext2", "wikitext2-local"):
        if kind == "wikitext2-local" and not arg:
            raise ValueError("wikitext2-local needs a folder: wikitext2-local:<dir>")
        texts = _wikitext_hub(split) if kind == "wikitext2" else _wikitext_local(Path(arg), split)
        return "\n\n".join(texts), {"join": "\\n\\n", "documents": len(texts), "split": split}
    if kind in ("c4", "c4-local"):
        if kind == "c4-local" and not arg:
            raise ValueError("c4-local needs a folder: c4-local:<dir>")
        if kind == "c4":
            texts = _c4_hub(C4_VALIDATION_FILE, "validation")[:C4_VALIDATION_DOCS]
        else:
            texts = _c4_local(Path(arg), C4_VALIDATION_FILE)[:C4_VALIDATION_DOCS]
        return " ".join(texts), {"join": " ", "documents": len(texts), "split": "validation",
                                 "max_windows": C4_VALIDATION_WINDOWS}
    if kind == "json" and arg:
        texts = _read_jsonl_texts(Path(arg))
        return "\n\n".join(texts), {"join": "\\n\\n", "documents": len(texts)}
    if kind == "text" and arg:
        texts = _read_paragraphs(Path(arg))
        return "\n\n".join(texts), {"join": "\\n\\n", "documents": len(texts)}
    raise ValueError(f"unknown perplexity dataset {dataset!r}")


# ----------------------------------------------------------------------------------------------
# tokenisation


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's default encoding prepends its BOS token (Llama does, GPT-2 style not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The tokenizer's own convention (add_special_tokens default), as the reference scripts do.
    # verbose=False silences the "longer than model_max_length" warning: we window ourselves.
    return list(tokenizer(text, verbose=False)["input_ids"])


def perplexity_ids(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    seqlen: int,
    split: str = "test",
    with_meta: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """1-D token stream for perplexity (C4 truncated to 256 x seqlen tokens as in the protocol)."""
    text, meta = perplexity_text(dataset, split=split)
    ids = _encode(tokenizer, text)
    if "max_windows" in meta:
        ids = ids[: meta["max_windows"] * seqlen]
    tensor = torch.tensor(ids, dtype=torch.long)
    meta.update(dataset=dataset, bos=adds_bos(tokenizer), tokens=len(ids), seqlen=seqlen)
    return (tensor, meta) if with_meta else tensor


def calibration_ids(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    mode: str = "auto",
    with_meta: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """(nsamples, seqlen) calibration windows, seeded (SPEC §5.1; ``mode`` in auto|documents|joined)."""
    if mode not in ("auto", "documents", "joined"):
        raise ValueError(f"mode must be auto, documents or joined, not {mode!r}")
    documents = calibration_documents(source)
    if not documents:
        raise ValueError(f"{source!r} has no documents")
    hub = _split_source(source)[0] in ("c4", "wikitext2")
    encoded: dict[int, list[int]] = {}

    def encode(index: int) -> list[int]:
        if index not in encoded:
            encoded[index] = _encode(tokenizer, documents[index])
        return encoded[index]

    if mode == "auto":
        # The hub corpus is too big to tokenise up front and is known to have long documents.
        if hub:
            mode = "documents"
        else:
            # Count until the threshold, without keeping the token lists: a whole C4 shard held as
            # Python ints is ≈ 37 B per token (6–8 GB), where the count needs a few documents.
            needed, long_docs = min(MIN_LONG_DOCUMENTS, nsamples), 0
            for index in range(len(documents)):
                long_docs += len(_encode(tokenizer, documents[index])) > seqlen
                if long_docs >= needed:
                    break
            mode = "documents" if long_docs >= needed else "joined"
    rng = random.Random(seed)
    if mode == "documents":
        rows = _sample_documents(rng, encode, len(documents), nsamples, seqlen)
    else:
        stream = _encode(tokenizer, "\n\n".join(documents))
        if len(stream) <= seqlen:
            raise ValueError(f"{source!r} has only {len(stream)} tokens, fewer than seqlen + 1")
        rows = []
        for _ in range(nsamples):
            start = rng.randint(0, len(stream) - seqlen - 1)
            rows.append(stream[start : start + seqlen])
    ids = torch.tensor(rows, dtype=torch.long)
    meta = {
        "source": source,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "sampling": mode,
        "sampling_note": (
            "random document with > seqlen tokens, random seqlen window (SPEC 5.1)" if mode == "documents"
            else "documents joined with \\n\\n, random seqlen windows of the stream (substitute variant)"
        ),
        "documents": len(documents),
        "bos": adds_bos(tokenizer),
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
    }
    return (ids, meta) if with_meta else ids


def _sample_documents(
    rng: random.Random, encode: Callable[[int], list[int]], count: int, nsamples: int, seqlen: int
) -> list[list[int]]:
    rows = []
    attempts = 0
    for _ in range(nsamples):
        while True:
            attempts += 1
            if attempts > 1000 * nsamples + 10000:
                raise ValueError(f"could not find documents longer than {seqlen} tokens")
            ids = encode(rng.randint(0, count - 1))
            if len(ids) > seqlen:
                break
        # randint(0, n - seqlen - 1), exactly as in the GPTQ/SparseGPT loaders.
        start = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[start : start + seqlen])
    return rows


# ----------------------------------------------------------------------------------------------
# calibration files


def ids_sha256(input_ids: torch.Tensor) -> str:
    """Hash of the token ids (as little-endian int64), independent of how the file is serialised."""
    array = input_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    digest = hashlib.sha256(array.astype("<i8").tobytes())
    digest.update(repr(tuple(array.shape)).encode())
    return digest.hexdigest()


def save_calibration(path: str | Path, input_ids: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``{"input_ids", "meta"}`` atomically; the meta gains ``sha256`` and ``shape``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_ids = input_ids.detach().to("cpu", torch.long).contiguous()
    meta = dict(meta, sha256=ids_sha256(input_ids), shape=list(input_ids.shape))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"input_ids": input_ids, "meta": meta}, tmp)
    os.replace(tmp, path)
    return meta


def load_calibration(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a calibration file and check its hash."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    input_ids, meta = payload["input_ids"], payload["meta"]
    if meta.get("sha256") is not None and ids_sha256(input_ids) != meta["sha256"]:
        raise ValueError(f"{path}: token ids do not match their recorded sha256")
    return input_ids, meta
