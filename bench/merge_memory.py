"""Peak host memory of `merge_boundary_rotations` (issue 11 item 5).

    PYTHONPATH=src python bench/merge_memory.py --hidden 4096 --layers 8 --vocab 8192

Runs in this process on a duck-typed adapter (embedding, final norm, lm_head: all that the merge
touches) with fp32 rotations, and prints the growth of the process's peak resident set
(ru_maxrss) during the merge, beyond the inputs, and the size of its output (the boundary
matrices, L-1 fp32 d×d, which the merged export carries by design).
"""

from __future__ import annotations

import argparse
import gc
import resource
from types import SimpleNamespace

import torch
from torch import nn

from denoiserotator.method.rotation.fuse import merge_boundary_rotations


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    d = args.hidden
    torch.manual_seed(0)
    rotations = [torch.randn(d, d) for _ in range(args.layers)]
    adapter = SimpleNamespace(
        embedding=nn.Embedding(args.vocab, d),
        lm_head=nn.Linear(d, args.vocab, bias=False),
        final_norm=SimpleNamespace(weight=nn.Parameter(torch.ones(d))),
        hidden_size=d,
        tied_embeddings=False,
    )
    gc.collect()
    before = peak_mib()
    boundary = merge_boundary_rotations(adapter, rotations)  # type: ignore[arg-type]
    after = peak_mib()
    output = sum(b.numel() * b.element_size() for b in boundary if b is not None) / 2**20
    inputs_mib = (args.layers * d * d * 4 + 2 * args.vocab * d * 4) / 2**20
    print(
        f"hidden={d} layers={args.layers} vocab={args.vocab}: inputs {inputs_mib:.0f} MiB, "
        f"peak RSS growth during merge {after - before:.0f} MiB, of which output {output:.0f} MiB, "
        f"temporaries ≈ {after - before - output:.0f} MiB"
    )


if __name__ == "__main__":
    main()
