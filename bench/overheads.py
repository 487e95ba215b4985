"""What DenoiseRotator costs besides training: host memory of a whole rotate+prune run, and the
forward time of the exported model. Side by side in one run, JSON out; not a timed test.

    .venv/bin/python -m bench.overheads --cache resources --out bench/results/overheads.json

1. Peak resident memory (ru_maxrss) of a full SmolLM2-135M rotate+prune (Wanda 2:4, a few
   rotation steps: memory does not depend on the step count), each in a fresh subprocess,
   against the size of the model's weights, for plain pruning and for rotation + pruning.
2. Forward time on the same tokens of: the unrotated model, the exported rotated model with
   merged boundaries (one d×d matmul per layer boundary), and the unmerged form (two d×d
   matmuls per layer: rotate in and out). Medians of repeated forwards, interleaved so that a
   busy machine slows all three alike; the ratios are what to read.
3. With `--families`, only this: the exported forward overhead per family on random models of
   Gemma-3-1B's layer shapes (d 1152, intermediate 6912, 4 heads of 256, 1 KV head; 4 layers,
   a 4096-token vocabulary so the head does not dominate), LLaMA layout against Gemma 3's, whose
   two post-norms per layer become d×d matrices:

    .venv/bin/python -m bench.overheads --families --out bench/results/overheads_families.json

4. With `--r1-blocks 1 2 4 8`, only this: the exported forward overhead of block-diagonal R1
   (`rotation.r1_blocks`) on random models of LLaMA-3-8B's layer shapes:

    .venv/bin/python -m bench.overheads --r1-blocks 1 2 4 8 --out bench/results/overheads_r1_blocks.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import study_parser, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one rotate+prune, then prints its peak RSS in MB."""
    from denoiserotator.files.assets import fetch_corpus, fetch_smollm2
    from denoiserotator.files.export import load_model
    from denoiserotator.files.text import calibration_ids
    from denoiserotator.method.sequential import PruneSettings, run_pipeline
    from denoiserotator.settings import RotationSettings

    model_dir, corpus = fetch_smollm2(args.cache), fetch_corpus(args.cache)
    model, tokenizer = load_model(model_dir)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = calibration_ids(
        tokenizer, f"json:{corpus / 'sotu-train.jsonl'}", args.nsamples, args.seqlen, seed=0
    )
    rotation = RotationSettings(steps=args.steps) if args.child == "denoise" else None
    run_pipeline(model, ids, PruneSettings(pruner="wanda", pattern="2:4", rotation=rotation), progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(json.dumps({"peak_rss_mb": peak_mb, "after_load_rss_mb": loaded_mb}))


def peak_memory(args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.files.assets import fetch_smollm2
    from denoiserotator.files.export import load_model

    model, _ = load_model(fetch_smollm2(args.cache))
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out: dict[str, Any] = {"weights_mb": weights_mb, "calibration": f"{args.nsamples} x {args.seqlen}"}
    for mode in ("none", "denoise"):
        sizes = ["--steps", str(args.steps), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        command = [sys.executable, __file__, "--child", mode, "--cache", str(args.cache), *sizes]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["peak_over_weights"] = result["peak_rss_mb"] / weights_mb
        out[f"rotation_{mode}"] = result
    return out


def _median_forward_seconds(
    models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Median seconds of a forward of each model on `ids`, after one warm-up each; the runs are
    interleaved so that a busy machine slows every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(ids)
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model(ids)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_times(args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.files.assets import fetch_smollm2
    from denoiserotator.files.export import load_model
    from denoiserotator.files.modeling_denoiserotator import attach_boundary_rotations
    from denoiserotator.method.sequential import PruneSettings, run_pipeline
    from denoiserotator.settings import RotationSettings

    model_dir = fetch_smollm2(args.cache)
    ids = torch.randint(0, 49152, (1, args.forward_tokens), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(pruner="none", pattern=None, rotation=RotationSettings(steps=2))
    plain, _ = load_model(model_dir)
    merged, _ = load_model(model_dir)
    result = run_pipeline(merged, ids[:, :64].repeat(2, 1), settings, progress=False)
    merged = attach_boundary_rotations(result.model, result.boundary)
    unmerged, _ = load_model(model_dir)
    run_pipeline(unmerged, ids[:, :64].repeat(2, 1), settings, progress=False, merge_boundaries=False)
    models = {"unrotated": plain.eval(), "merged": merged.eval(), "unmerged": unmerged.eval()}
    medians = _median_forward_seconds(models, ids, args.repeats)
    with torch.inference_mode():
        reference = models["unrotated"](ids).logits
        max_diff = {
            name: float((model(ids).logits - reference).abs().max()) for name, model in models.items()
        }
    return {
        "tokens": args.forward_tokens,
        "repeats": args.repeats,
        "median_seconds": medians,
        "merged_over_unrotated": medians["merged"] / medians["unrotated"],
        "unmerged_over_unrotated": medians["unmerged"] / medians["unrotated"],
        "max_logit_difference_vs_unrotated": max_diff,
    }


def family_forward_times(args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.files.modeling_denoiserotator import attach_boundary_rotations
    from denoiserotator.method.sequential import PruneSettings, run_pipeline
    from denoiserotator.settings import RotationSettings
    from denoiserotator.testing import tiny_model

    shape = dict(hidden_size=1152, intermediate_size=6912, num_attention_heads=4, num_key_value_heads=1,
                 head_dim=256, vocab_size=4096, max_position_embeddings=4096)  # fmt: skip
    ids = torch.randint(0, 4096, (1, args.forward_tokens), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(pruner="none", pattern=None, rotation=RotationSettings(steps=2))
    out: dict[str, Any] = {"tokens": args.forward_tokens, "repeats": args.repeats, "layers": 4, **shape}
    for family in ("llama", "gemma3_text"):
        plain = tiny_model(family, num_layers=4, **shape)
        result = run_pipeline(tiny_model(family, num_layers=4, **shape), ids[:, :64].repeat(2, 1), settings,
                              progress=False)  # fmt: skip
        merged = attach_boundary_rotations(result.model, result.boundary)
        models = {"unrotated": plain.eval(), "merged": merged.eval()}
        medians = _median_forward_seconds(models, ids, args.repeats)
        with torch.inference_mode():
            difference = float((merged(ids).logits - plain(ids).logits).abs().max())
        ratio = medians["merged"] / medians["unrotated"]
        out[family] = {"median_seconds": medians, "merged_over_unrotated": ratio,
                       "max_logit_difference": difference}  # fmt: skip
    return out


def block_forward_times(args: argparse.Namespace) -> dict[str, Any]:
    """Forward time of exported models whose R1 has 1, 2, 4, 8... diagonal blocks
    (`rotation.r1_blocks`), against the unrotated model, on random models of LLaMA-3-8B's layer
    shapes (d 4096, intermediate 14336, 32 heads, 8 KV heads; `--block-layers` layers, a
    4096-token vocabulary so the head does not dominate). The boundary matrices are random
    block-diagonal orthogonal ones attached to the unrotated weights: the exported model runs
    the same modules whatever was learned (learning them on 8B shapes would take an hour here),
    and that the learned ones preserve the function is tested (tests/method/test_r1_blocks.py).
    L layers have L − 1 boundaries (the first and last rotations are merged into the embedding
    and the head)."""
    import copy

    from denoiserotator.files.modeling_denoiserotator import BoundaryRotation, attach_boundary_rotations
    from denoiserotator.testing import tiny_model

    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=4096, max_position_embeddings=4096)  # fmt: skip
    layers, hidden = args.block_layers, shape["hidden_size"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (1, args.forward_tokens), generator=generator)
    plain = tiny_model("llama", num_layers=layers, **shape).eval()
    medians: dict[str, float] = {}
    ratios: dict[str, float] = {}
    # one rotated model at a time next to the unrotated one (8B-shaped layers are 1.9 GB each)
    for blocks in args.r1_blocks:
        size = hidden // blocks
        pieces = [torch.linalg.qr(torch.randn(size, size, generator=generator))[0] for _ in range(blocks)]
        boundary = [None] + [torch.block_diag(*pieces) for _ in range(layers - 1)]
        model = attach_boundary_rotations(copy.deepcopy(plain), boundary).eval()
        applied = {m.blocks for m in model.modules() if isinstance(m, BoundaryRotation)}
        assert applied == {blocks}, (blocks, applied)
        name = f"blocks={blocks}"
        pair = _median_forward_seconds({"unrotated": plain, name: model}, ids, args.repeats)
        medians[name], medians[f"unrotated next to {name}"] = pair[name], pair["unrotated"]
        ratios[name] = pair[name] / pair["unrotated"]
        del model
    return {
        "tokens": args.forward_tokens, "repeats": args.repeats, "layers": layers, "boundaries": layers - 1,
        **shape, "median_seconds": medians, "over_unrotated": ratios,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = study_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "resources")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--forward-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--families", action="store_true", help="only the per-family forward overhead")
    parser.add_argument("--r1-blocks", type=int, nargs="+", help="only the overhead of these R1 block counts")
    parser.add_argument("--block-layers", type=int, default=2, help="layers of the --r1-blocks models (≥ 2)")
    parser.add_argument("--child", choices=("none", "denoise"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _peak_rss_child(args)
        return
    if args.r1_blocks:
        report = {"torch_threads": torch.get_num_threads(), "r1_blocks": block_forward_times(args)}
        write_report(report, args.out)
        return
    if args.families:
        report = {"torch_threads": torch.get_num_threads(), "families": family_forward_times(args)}
        write_report(report, args.out)
        return
    report = {
        "torch_threads": torch.get_num_threads(),
        "memory": peak_memory(args),
        "forward": forward_times(args),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
