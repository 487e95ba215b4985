"""The reference code's rotation training against this package's, on the same real layer problem.

For SmolLM2-135M layers (norm-folded weights and the Grams of their inputs from 32 x 512
calibration tokens of sotu-train, seed 0, collected after the dense layers before them; the
same stash as `bench/rotation_speed.py`), trains R1/R2 for `--steps` steps with:

- the public reference code itself (`--reference-code`: a checkout of
  github.com/Axel-gu/DenoiseRotator; its `RotatorOptimizer_wanda` / `_sparsegpt` from
  `llama_utils.py` and the training loop of `llama_prune.py`: Adam lr 0.01 on the QR
  parametrisation, gradient clip 1.0, best iterate by its bf16 loss; its Hessians are the
  Grams scaled by 2 / nsamples as its `SparseGPT.add_batch` makes them; run eagerly on the CPU);
- this package with `loss_variant: reference` and `optimizer: paper` (its emulation of the above);
- this package with the paper's fp32 loss and `optimizer: paper` (SPEC §4 as written);
- this package's default (`optimizer: cayley`, paper loss);
- the default optimizer on the magnitude loss (`loss_score: magnitude`).

Every result is scored twice, on equal terms: by the paper's fp32 loss of the score being
pruned with (`layer_loss`), and by what pruning does with the rotation: the relative output
error sqrt(tr(D H Dᵀ) / tr(W H Wᵀ)) of each fused linear pruned 50% with that score on its
rotated Gram (the layer's own inputs; true-sequential re-collection is left out here).

    .venv/bin/python -m bench.reference_layer_check --reference-code /path/to/DenoiseRotator \\
        --layers 3 10 20 --out bench/results/reference_layer_check.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Before torch is imported: the reference's @torch.compile kernels then run eagerly on the CPU.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from bench.common import study_parser  # noqa: E402
from bench.magnitude_study import _relative_error as relative_output_error  # noqa: E402
from bench.rotation_speed import real_layer_data  # noqa: E402
from denoiserotator.method.pruners import parse_pattern, prune_weight  # noqa: E402
from denoiserotator.method.rotation.fuse import block_diag, expand_kv_blocks  # noqa: E402
from denoiserotator.method.rotation.problem import LayerProblem, layer_loss  # noqa: E402
from denoiserotator.method.rotation.train import train_rotation  # noqa: E402
from denoiserotator.settings import RotationSettings  # noqa: E402

HF_NAMES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}  # fmt: skip
GRAM_OF = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}

PACKAGE_RUNS: dict[str, dict[str, str]] = {
    "package: reference loss, Adam on QR": {"loss_variant": "reference", "optimizer": "paper"},
    "package: paper loss, Adam on QR": {"optimizer": "paper"},
    "package default: paper loss, cayley": {},
    "package: magnitude loss, cayley": {"loss_score": "magnitude"},
}


class _Linear:
    """What the reference's RotatorOptimizer reads from a module: `.weight`."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


def reference_code_training(
    module: Any, data: dict[str, Any], score: str, steps: int, nsamples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """llama_prune.py's loop around the reference's RotatorOptimizer; returns R1 (the Q whose
    transpose it fuses) and the R2 blocks of its best iterate."""
    weights = [{HF_NAMES[n]: _Linear(w.float().clone()) for n, w in data["weights"].items()}]
    hessians = [{HF_NAMES[n]: (2 / nsamples) * data["grams"][GRAM_OF[n]].float() for n in HF_NAMES}]
    optimizer_class = {"wanda": module.RotatorOptimizer_wanda, "sparsegpt": module.RotatorOptimizer_sparsegpt}
    model = optimizer_class[score](
        weights, data["weights"]["q"].shape[1], num_key_value_heads=data["num_kv_heads"],
        head_dim=data["head_dim"], device="cpu", positive=True, hessian_dict_list=hessians,
    )  # fmt: skip
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    with torch.no_grad():
        best = model()
    best_r1, best_r2 = model.get_R1_list(), model.get_R2_list_list()
    for _ in range(steps):
        adam.zero_grad()
        loss = model()
        if loss < best:
            best, best_r1, best_r2 = loss.detach(), model.get_R1_list(), model.get_R2_list_list()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adam.step()
    return best_r1[0].detach().float(), torch.stack([b.detach().float() for b in best_r2[0]])


def pruning_errors(
    data: dict[str, Any], score: str, rotation: torch.Tensor, blocks: torch.Tensor
) -> dict[str, float]:
    """Relative output error of each fused linear pruned 50% with `score` on its rotated Gram."""
    weights, grams, heads = data["weights"], data["grams"], data["num_heads"]
    q = rotation.double()
    r2v, r2o = block_diag(blocks.double()), block_diag(expand_kv_blocks(blocks.double(), heads))
    w = {name: weight.double() for name, weight in weights.items()}
    fused = {
        "q": w["q"] @ q, "k": w["k"] @ q, "v": r2v.T @ w["v"] @ q, "o": q.T @ w["o"] @ r2o,
        "gate": w["gate"] @ q, "up": w["up"] @ q, "down": q.T @ w["down"],
    }  # fmt: skip
    rotated = {
        "q": q.T @ grams["q"].double() @ q, "o": r2o.T @ grams["o"].double() @ r2o,
        "gate": q.T @ grams["gate"].double() @ q, "down": grams["down"].double(),
    }  # fmt: skip
    errors = {}
    for name, weight in fused.items():
        gram = rotated[GRAM_OF[name]]
        pruned = prune_weight(score, weight.float(), gram.float(), parse_pattern("50%")).weight.double()
        errors[name] = relative_output_error(weight, pruned, gram)
    return errors


def check_layer(
    module: Any, cache: Path, layer: int, score: str, steps: int, nsamples: int
) -> dict[str, Any]:
    data = real_layer_data(cache, layer, nsamples, 512)
    shape = (data["num_heads"], data["num_kv_heads"], data["head_dim"])
    paper = LayerProblem.from_layer(data["weights"], data["grams"], score, *shape)  # type: ignore[arg-type]
    results: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {"identity": (*paper.identity(), 0.0)}
    started = time.perf_counter()
    results["reference code: bf16 loss, Adam on QR"] = (
        *reference_code_training(module, data, score, steps, nsamples),
        time.perf_counter() - started,
    )
    for label, fields in PACKAGE_RUNS.items():
        problem = LayerProblem.from_layer(
            data["weights"], data["grams"], fields.get("loss_score", score), *shape,  # type: ignore[arg-type]
            variant=fields.get("loss_variant", "paper"),  # type: ignore[arg-type]
        )  # fmt: skip
        started = time.perf_counter()
        trained = train_rotation(problem, RotationSettings(steps=steps, **fields), progress=False)
        results[label] = (trained.rotation, trained.head_blocks, time.perf_counter() - started)
    rows = {}
    for label, (rotation, blocks, seconds) in results.items():
        errors = pruning_errors(data, score, rotation, blocks)
        rows[label] = {
            "paper_loss": float(layer_loss(paper, rotation.float(), blocks.float(), "paper")),
            "mean_pruning_error": sum(errors.values()) / len(errors),
            "pruning_error": errors,
            "seconds": round(seconds, 1),
        }
        print(f"layer {layer:2d} {score:9s} {label:40s} paper loss {rows[label]['paper_loss']:9.1f}  "
              f"mean error {rows[label]['mean_pruning_error']:.4f}", file=sys.stderr)  # fmt: skip
    return {"layer": layer, "score": score, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = study_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--reference-code", type=Path, required=True, help="checkout of the reference repository"
    )
    parser.add_argument("--cache", type=Path, default=REPO / "resources")
    parser.add_argument("--layers", type=int, nargs="+", default=[10])
    parser.add_argument("--scores", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.reference_code))
    import llama_utils  # the reference code's module  # noqa: PLC0415

    report: dict[str, Any] = {
        "reference_code": str(args.reference_code),
        "steps": args.steps,
        "calibration": f"sotu-train, {args.nsamples} x 512, seed 0",
        "pattern": "50%",
        "layers": [],
    }
    for layer in args.layers:
        for score in args.scores:
            report["layers"].append(
                check_layer(llama_utils, args.cache, layer, score, args.steps, args.nsamples)
            )
            if args.out:
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
