"""One real-shaped decoder layer through rotate + prune on this CPU: measured peak memory beside
what the cost model assumes for that layer. JSON out; not a timed test.

    .venv/bin/python -m bench.layer_memory --shapes 8b --out bench/results/layer_memory.json

For each shape (LLaMA-3-8B: hidden 4096, 32/8 heads, intermediate 14336; LLaMA-3-70B: 8192, 64/8,
28672), a one-layer Llama with random weights held in bf16 on the host runs `run_pipeline`
(SparseGPT 50 %, the default `cayley` rotation for a few steps, a few hundred calibration tokens)
in a fresh process, on the CPU in fp32 as the CPU path computes. Reported: the peak resident memory
(ru_maxrss) less the process's memory before the layer was built, against
`costs.prune_gpu_bytes`'s per-layer estimate (what a GPU must hold: the layer in fp32, the
rotation training, the fp64 Gram and inverse of the widest input) plus the layer's bf16 host copy.
A shape whose estimate exceeds this machine's memory is not run and says so (the 70B layer needs
≈ 45 GiB by the model: not on a 24 GiB machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from bench.common import study_parser, write_report  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "8b": {"hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336},
    "70b": {"hidden": 8192, "heads": 64, "kv_heads": 8, "intermediate": 28672},
}


def _child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from denoiserotator.method.sequential import PruneSettings, run_pipeline
    from denoiserotator.settings import ComputeSettings, RotationSettings

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB → GiB
    shape = SHAPES[args.child]
    config = LlamaConfig(hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(
        pruner="sparsegpt", pattern="50%", rotation=RotationSettings(steps=args.steps, tol=0.0),
        compute=ComputeSettings(device="cpu", dtype="float32", threads=os.cpu_count() or 1),
    )  # fmt: skip
    started = time.perf_counter()
    result = run_pipeline(model, ids, settings, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"peak_gib": peak, "before_gib": before, "seconds": time.perf_counter() - started,
                      "rotation_steps": result.layer_stats[0].get("rotation_steps")}))  # fmt: skip


def _machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def run_shape(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.plan import costs, flops
    from denoiserotator.plan.experiment import Experiment

    shape = SHAPES[name]
    entry = {"slug": name, "params_b": 1.0, "shape": {**shape, "layers": 1}, "resources": {}, "dtype": None}
    exp = Experiment.__new__(Experiment)  # only `models` is read by prune_gpu_bytes
    exp.models = {name: entry}
    layer = flops.LayerShape.from_entry(entry)
    assert layer is not None
    estimate = (costs.prune_gpu_bytes(exp, name) or 0) + layer.layer_params * 2  # + the bf16 host copy
    out: dict[str, Any] = {
        "shape": shape,
        "model_estimate_gib": estimate / 2**30,
        "machine_gib": _machine_gib(),
    }
    if estimate / 2**30 > 0.9 * _machine_gib():
        out["skipped"] = "the cost model's estimate exceeds this machine's memory"
        return out
    sizes = ["--steps", str(args.steps), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    proc = subprocess.run([sys.executable, __file__, "--child", name, *sizes], capture_output=True, text=True)
    if proc.returncode != 0:
        out["error"] = proc.stderr[-2000:]
        return out
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    measured["layer_peak_gib"] = measured["peak_gib"] - measured["before_gib"]
    out.update(measured, measured_over_model=measured["layer_peak_gib"] / (estimate / 2**30))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = study_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["8b", "70b"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--child", choices=sorted(SHAPES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    report = {name: run_shape(name, args) for name in args.shapes}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
