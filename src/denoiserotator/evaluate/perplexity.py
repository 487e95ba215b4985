"""Perplexity over non-overlapping windows of a token stream (SPEC §5.5).

The stream is cut into ``len // seqlen`` windows (the remainder is dropped); every window is scored
on its own, and PPL = exp(mean NLL over all predicted tokens, i.e. seqlen - 1 per window). The
sequence length is always explicit, never taken from ``max_position_embeddings``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """``{"ppl", "nll", "windows", "tokens", "seqlen"}`` for ``token_ids`` (1-D) in windows of ``seqlen``."""
    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    token_ids = token_ids.reshape(-1).to(torch.long)
    windows = token_ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"{token_ids.numel()} tokens do not fill one window of {seqlen}")
    device = device or str(next(model.parameters()).device)
    batches = token_ids[: windows * seqlen].view(windows, seqlen).split(batch_size)
    total_nll = 0.0
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not sys.stderr.isatty()):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # fp32 (and a sum in fp64) so long streams do not lose precision in the mean.
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll.double())
    tokens = windows * (seqlen - 1)
    mean_nll = total_nll / tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": windows, "tokens": tokens,
            "seqlen": seqlen}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Perplexity in non-overlapping windows (remainder dropped).")
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--dataset", required=True,
                        help="wikitext2 | wikitext2-local:DIR | c4 | c4-local:DIR | json:FILE | text:FILE")
    parser.add_argument("--seqlen", type=int, required=True)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    args = parser.parse_args(argv)
    from denoiserotator.data import perplexity_ids
    from denoiserotator.export import load_model
    from denoiserotator.jsonio import write_json

    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    ids, meta = perplexity_ids(tokenizer, args.dataset, args.seqlen, with_meta=True)
    result = perplexity(model, ids, args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                        device=args.device)
    result.update(dataset=args.dataset, bos=meta["bos"], stream_tokens=meta["tokens"], join=meta["join"],
                  documents=meta["documents"], model=str(args.model), max_windows=args.max_windows)
    write_json(args.out, result)
    print(f"ppl {result['ppl']:.4f} over {result['windows']} windows of {args.seqlen}", file=sys.stderr)


if __name__ == "__main__":
    main()
