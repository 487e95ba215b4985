"""Peak host memory of two steps that hold d×d matrices: merging the boundary rotations
(`merge_boundary_rotations`) and SparseGPT's inverse-Hessian factor (`inverse_hessian_cholesky`).

    .venv/bin/python -m bench.host_memory --hidden 4096 --layers 8 --vocab 8192 --features 4096 \\
        --out bench/results/host_memory.json

Each part runs in this process and reports the growth of the process's peak resident set
(ru_maxrss, Linux) during the step, beyond its inputs: for the merge also the size of its output
(the boundary matrices, L-1 fp32 d×d, which a merged export carries by design), for the factor
the growth in units of one fp64 (features, features) matrix. Run the parts in separate processes
(`--parts merge`, `--parts sparsegpt`) for independent peaks: ru_maxrss never decreases.
"""

from __future__ import annotations

import gc
import resource
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from bench.common import study_parser, write_report
from denoiserotator.method.pruners.sparsegpt import inverse_hessian_cholesky
from denoiserotator.method.rotation.fuse import merge_boundary_rotations


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def merge(hidden: int, layers: int, vocab: int) -> dict[str, Any]:
    torch.manual_seed(0)
    rotations = [torch.randn(hidden, hidden) for _ in range(layers)]
    adapter = SimpleNamespace(
        embedding=nn.Embedding(vocab, hidden),
        lm_head=nn.Linear(hidden, vocab, bias=False),
        final_norm=SimpleNamespace(weight=nn.Parameter(torch.ones(hidden))),
        hidden_size=hidden,
        tied_embeddings=False,
    )
    gc.collect()
    before = peak_mib()
    boundary = merge_boundary_rotations(adapter, rotations)  # type: ignore[arg-type]
    growth = peak_mib() - before
    output = sum(b.numel() * b.element_size() for b in boundary if b is not None) / 2**20
    return {"hidden": hidden, "layers": layers, "vocab": vocab,
            "inputs_mib": (layers * hidden * hidden * 4 + 2 * vocab * hidden * 4) / 2**20,
            "peak_growth_mib": growth, "output_mib": output, "temporaries_mib": growth - output}  # fmt: skip


def sparsegpt(features: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(features + 64, features)
    gram = x.T @ x  # fp32, as collected on a GPU
    del x
    before = peak_mib()
    inverse_hessian_cholesky(gram, 0.01)
    growth = peak_mib() - before
    return {"features": features, "peak_growth_mib": growth,
            "in_fp64_matrices": growth * 2**20 / (features * features * 8)}  # fmt: skip


def main() -> None:
    parser = study_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("merge", "sparsegpt"), default=["merge", "sparsegpt"])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096)
    args = parser.parse_args()
    report: dict[str, Any] = {}
    if "merge" in args.parts:
        report["merge"] = merge(args.hidden, args.layers, args.vocab)
    if "sparsegpt" in args.parts:
        report["sparsegpt"] = sparsegpt(args.features)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
