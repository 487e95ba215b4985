"""What LoRA training keeps for backward, per token: the measurement behind the LoRA GPU-memory
model (`flops.lora_saved_bytes`, `costs.finetune_gpu_bytes`). JSON out; not a timed test.

    .venv/bin/python -m bench.lora_memory --out bench/results/lora_memory.json

For tiny Llama configs of several widths, depths and vocabularies (fp32, SDPA attention, peft
adapters on all seven linears with dropout, training mode), the bytes of the tensors autograd
saves in one forward (`testing.lora_saved_bytes`: parameters excluded), per token, with and
without gradient checkpointing; then the least-squares fit per layer·hidden, layer·intermediate,
layer·heads·seqlen (attention probabilities: 0 with SDPA), vocabulary, hidden and a constant,
in bytes and in fp32 values. The constants in `flops` round these.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.common import study_parser, write_report  # noqa: E402
from denoiserotator.testing import lora_saved_bytes, sized_llama

# (hidden, intermediate, heads, layers, vocab, seqlen)
SHAPES = [(64, 160, 4, 2, 384, 64), (64, 160, 4, 3, 384, 64), (128, 160, 4, 2, 384, 64),
          (64, 320, 4, 2, 384, 64), (128, 352, 8, 2, 384, 32), (64, 160, 4, 2, 768, 64),
          (128, 320, 8, 3, 768, 64), (96, 256, 4, 2, 512, 32), (64, 160, 8, 2, 384, 128)]  # fmt: skip
FEATURES = ["layers*hidden", "layers*intermediate", "layers*heads*seqlen", "vocab", "hidden", "constant"]


def measure(
    hidden: int, intermediate: int, heads: int, layers: int, vocab: int, seqlen: int, checkpointing: bool
) -> float:
    model = sized_llama(hidden, intermediate, heads, layers, vocab)
    ids = torch.randint(0, vocab, (2, seqlen), generator=torch.Generator().manual_seed(0))
    return lora_saved_bytes(model, ids, checkpointing) / ids.numel()


def main() -> None:
    parser = study_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    rows = np.array([[n * d, n * f, n * h * s, v, d, 1] for d, f, h, n, v, s in SHAPES], dtype=float)
    report: dict = {"shapes": SHAPES, "features": FEATURES}
    for checkpointing in (False, True):
        per_token = np.array([measure(*shape, checkpointing) for shape in SHAPES])
        coefficients, *_ = np.linalg.lstsq(rows, per_token, rcond=None)
        fitted = rows @ coefficients
        report["checkpointing" if checkpointing else "no_checkpointing"] = {
            "bytes_per_token": per_token.round(1).tolist(),
            "coefficients_bytes": dict(zip(FEATURES, coefficients.round(3).tolist(), strict=True)),
            "coefficients_fp32_values": dict(
                zip(FEATURES, (coefficients / 4).round(3).tolist(), strict=True)
            ),
            "max_relative_residual": float(np.abs(fitted - per_token).max() / per_token.min()),
        }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
