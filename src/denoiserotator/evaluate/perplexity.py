"""Perplexity over non-overlapping windows of a token stream (SPEC §5.5).

The stream is cut into ``len // seqlen`` windows (the remainder is dropped); every window is scored
on its own, and PPL = exp(mean NLL over all predicted tokens, i.e. seqlen - 1 per window). The
sequence length is always explicit, never taken from ``max_position_embeddings``.

Uncertainty: every window predicts the same number of tokens, so the mean NLL is the mean of
the per-window mean NLLs; their spread gives its standard error, se = sd(window NLLs) / sqrt(W)
(sample sd, W windows), and the interval exp(nll ± se) around the perplexity. Windows are
consecutive text and not strictly independent, so this is an estimate of the sampling noise,
not a bound.
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

from denoiserotator.settings import DTYPES, ComputeSettings, PerplexitySettings


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | None = None,
) -> dict[str, Any]:
    """``{"ppl", "nll", "windows", "tokens", "seqlen", ...}`` of ``token_ids`` (1-D) in ``seqlen`` windows.

    ``nll`` is the mean NLL per predicted token (nats), ``window_nll`` the mean NLL of each
    window (W floats), ``nll_stderr`` their standard error (None for a single window) and
    ``ppl_low``/``ppl_high`` = exp(nll ∓ nll_stderr). Raises ValueError for seqlen < 2 or a
    stream shorter than one window.
    """
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
    window_nll: list[float] = []
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not sys.stderr.isatty()):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # fp32 per token (and sums in fp64) so long streams do not lose precision in the mean.
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        window_nll += (nll.double().view(batch.shape[0], seqlen - 1).sum(dim=1) / (seqlen - 1)).tolist()
    tokens = windows * (seqlen - 1)
    # Equal tokens per window: the mean over tokens is the mean over windows.
    mean_nll = math.fsum(window_nll) / windows
    stderr = None
    if windows > 1:
        variance = math.fsum((x - mean_nll) ** 2 for x in window_nll) / (windows - 1)
        stderr = math.sqrt(variance / windows)
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "windows": windows,
        "tokens": tokens,
        "seqlen": seqlen,
        "window_nll": window_nll,
        "nll_stderr": stderr,
        "ppl_low": math.exp(mean_nll - stderr) if stderr is not None else None,
        "ppl_high": math.exp(mean_nll + stderr) if stderr is not None else None,
    }


def perplexity_stage(
    model_dir: Path, out: Path, settings: PerplexitySettings, compute: ComputeSettings
) -> dict[str, Any]:
    """Perplexity of the model folder `model_dir` on one set, loaded in `compute.dtype` on
    `compute`'s device; writes the result JSON `out` and returns it."""
    from denoiserotator.data import perplexity_ids
    from denoiserotator.export import load_model
    from denoiserotator.jsonio import write_json

    device = compute.resolved_device()
    model, tokenizer = load_model(model_dir, dtype=DTYPES[compute.dtype], device=device)
    ids, meta = perplexity_ids(tokenizer, settings.dataset, settings.seqlen, with_meta=True)
    result = perplexity(model, ids, settings.seqlen, max_windows=settings.max_windows,
                        batch_size=compute.eval_batch_size, device=device)  # fmt: skip
    result.update(dataset=settings.dataset, bos=meta["bos"], stream_tokens=meta["tokens"], join=meta["join"],
                  documents=meta["documents"], model=str(model_dir), max_windows=settings.max_windows,
                  dtype=compute.dtype)  # fmt: skip
    write_json(out, result)
    interval = "" if result["nll_stderr"] is None else f" [{result['ppl_low']:.4f}, {result['ppl_high']:.4f}]"
    print(f"ppl {result['ppl']:.4f}{interval} over {result['windows']} windows of {settings.seqlen}",
          file=sys.stderr)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Perplexity in non-overlapping windows (remainder dropped).")
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    PerplexitySettings.add_arguments(parser, only=("dataset", "seqlen", "max_windows"))
    ComputeSettings.add_arguments(parser, only=("device", "dtype", "eval_batch_size"))
    args = parser.parse_args(argv)
    perplexity_stage(args.model, args.out, PerplexitySettings.from_namespace(args),
                     ComputeSettings.from_namespace(args))  # fmt: skip


if __name__ == "__main__":
    main()
