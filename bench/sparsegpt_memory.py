"""Peak host memory of SparseGPT's inverse-Hessian factor (issue 11 item 5).

    PYTHONPATH=src python bench/sparsegpt_memory.py --features 4096

Prints the growth of the process's peak resident set (ru_maxrss) while
`inverse_hessian_cholesky` factors a (features, features) Gram matrix, in units of one fp64
(features, features) matrix.
"""

from __future__ import annotations

import argparse
import resource

import torch

from denoiserotator.method.pruners.sparsegpt import inverse_hessian_cholesky


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=4096)
    n = parser.parse_args().features
    torch.manual_seed(0)
    x = torch.randn(n + 64, n)
    gram = x.T @ x  # fp32, as collected on a GPU
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    upper, _, _ = inverse_hessian_cholesky(gram, 0.01)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    growth = after - before
    print(f"features={n}: peak growth {growth / 2**20:.0f} MiB = {growth / (n * n * 8):.1f} fp64 (n, n)")


if __name__ == "__main__":
    main()
