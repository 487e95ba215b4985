"""Perplexity over non-overlapping windows of a token stream (SPEC §5.5).

The stream is cut into ``len // seqlen`` windows (the remainder is dropped); every window is scored
on its own, and PPL = exp(mean NLL over all predicted tokens, i.e. seqlen - 1 per window). The
sequence length is always explicit, never taken from ``max_position_embeddings``.

Two ways to run the model give the same numbers (tests/stages/test_perplexity.py): ``whole`` (the model on
the device, one forward per batch) and ``layerwise`` (`perplexity_layerwise`: the engine's capture of
what the first decoder layer receives, then one decoder layer at a time on the device while the
rest stays on the host, then final norm, lm_head and the NLL), as the original SparseGPT evaluation
(``llama_eval``) does, so that a 70B model is scored on one GPU.

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
    windows = _windows(token_ids, seqlen, max_windows)
    device = device or str(next(model.parameters()).device)
    window_nll: list[float] = []
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not sys.stderr.isatty()):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        window_nll += _window_nll(logits, batch)
    return _summary(window_nll, seqlen)


def _windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """(windows, seqlen) token ids: the stream cut in non-overlapping windows, remainder dropped."""
    if seqlen < 2:
        raise ValueError("seqlen must be at least 2")
    token_ids = token_ids.reshape(-1).to(torch.long)
    windows = token_ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"{token_ids.numel()} tokens do not fill one window of {seqlen}")
    return token_ids[: windows * seqlen].view(windows, seqlen)


def _summary(window_nll: list[float], seqlen: int) -> dict[str, Any]:
    windows = len(window_nll)
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
        "tokens": windows * (seqlen - 1),
        "seqlen": seqlen,
        "window_nll": window_nll,
        "nll_stderr": stderr,
        "ppl_low": math.exp(mean_nll - stderr) if stderr is not None else None,
        "ppl_high": math.exp(mean_nll + stderr) if stderr is not None else None,
    }


def _window_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each window: (batch, seqlen, vocab) logits against (batch, seqlen) ids."""
    # fp32 per token (and sums in fp64) so long streams do not lose precision in the mean.
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
    )
    return (nll.double().view(batch.shape[0], -1).sum(dim=1) / (batch.shape[1] - 1)).tolist()


@torch.inference_mode()
def perplexity_layerwise(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """`perplexity`, computed one decoder layer at a time on `device` (the model stays on the host).

    Embeddings → decoder layer 0 … L-1 → final norm → lm_head → NLL, with every window's hidden
    state (windows × seqlen × hidden in the model's dtype) kept on `device` between layers, as
    SparseGPT's ``llama_eval`` does. The inputs of layer 0 and the keyword arguments every layer
    receives (masks, position embeddings) are recorded from the model's own forward
    (`engine.capture_layer_inputs`); a rotated model's boundary rotations are forward pre-hooks of
    its decoder layers, so they act here exactly as in the whole-model forward. Batches of
    `batch_size` windows share the recorded kwargs; a smaller last batch gets its own recording.
    The model's modules are back on the CPU when this returns (also after an error).

    Returns the same record as `perplexity`.
    Raises ValueError for seqlen < 2 or a stream shorter than one window.
    """
    from denoiserotator.method.adapters import get_adapter
    from denoiserotator.method.engine import capture_layer_inputs, run_layer

    windows = _windows(token_ids, seqlen, max_windows)
    model = model.to("cpu")
    adapter = get_adapter(model)
    torch_device = torch.device(device)
    dtype = next(model.parameters()).dtype
    full = windows.shape[0] - windows.shape[0] % batch_size
    # One group per batch shape: the recorded kwargs (e.g. a causal mask) carry the batch size.
    groups = [part for part in (windows[:full], windows[full:]) if part.shape[0]]
    captured = [
        capture_layer_inputs(adapter, part, min(batch_size, part.shape[0]), torch_device, dtype)
        for part in groups
    ]
    hidden = [inputs.hidden for inputs in captured]
    try:
        for index in range(adapter.num_layers):
            layer = adapter.layers[index].to(torch_device)
            hidden = [run_layer(layer, states, inputs.layer_kwargs[index])
                      for states, inputs in zip(hidden, captured, strict=True)]  # fmt: skip
            adapter.layers[index].to("cpu")
        adapter.final_norm.to(torch_device)
        adapter.lm_head.to(torch_device)
        window_nll: list[float] = []
        for states, part in zip(hidden, groups, strict=True):
            batches = part.split(min(batch_size, part.shape[0]))
            for state, batch in zip(states, batches, strict=True):
                logits = adapter.head_logits(state)
                window_nll += _window_nll(logits, batch.to(torch_device))
    finally:
        model.to("cpu")
    return _summary(window_nll, seqlen)


def perplexity_stage(
    model_dir: Path, out: Path, settings: PerplexitySettings, compute: ComputeSettings
) -> dict[str, Any]:
    """Perplexity of the model folder `model_dir` on one set, loaded in `compute.dtype` on
    `compute`'s device, whole or layer by layer (`compute.resolved_eval_mode`); writes the result
    JSON `out` (with the mode used) and returns it."""
    from denoiserotator.files.export import load_model
    from denoiserotator.files.jsonio import write_json
    from denoiserotator.files.text import perplexity_ids

    device = compute.resolved_device()
    mode = compute.resolved_eval_mode(device)
    # Layer-wise: the model stays on the host and its layers visit the device one at a time.
    model, tokenizer = load_model(model_dir, dtype=DTYPES[compute.dtype],
                                  device="cpu" if mode == "layerwise" else device)  # fmt: skip
    ids, meta = perplexity_ids(tokenizer, settings.dataset, settings.seqlen, with_meta=True)
    score = perplexity_layerwise if mode == "layerwise" else perplexity
    result = score(model, ids, settings.seqlen, max_windows=settings.max_windows,
                   batch_size=compute.eval_batch_size, device=device)  # fmt: skip
    result.update(dataset=settings.dataset, bos=meta["bos"], stream_tokens=meta["tokens"], join=meta["join"],
                  documents=meta["documents"], model=str(model_dir), max_windows=settings.max_windows,
                  dtype=compute.dtype, eval_mode=mode)  # fmt: skip
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
    ComputeSettings.add_arguments(parser, only=("device", "dtype", "eval_batch_size", "eval_mode"))
    args = parser.parse_args(argv)
    perplexity_stage(args.model, args.out, PerplexitySettings.from_namespace(args),
                     ComputeSettings.from_namespace(args))  # fmt: skip


if __name__ == "__main__":
    main()
