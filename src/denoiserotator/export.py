"""Saving and loading model folders. (Minimal loader; the export work extends this module.)"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def load_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.to(device).eval(), tokenizer
