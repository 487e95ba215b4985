"""LoRA recovery fine-tuning of a pruned (and rotated) model that keeps its sparsity exactly (SPEC §5.6).

Paper (appendix F): r 8, alpha 32, dropout 0.1, lr 2e-4, weight decay 1e-2, linear schedule with
400 warm-up steps, 4096 x 2048 tokens of WikiText-2 train, rotations frozen. Not stated there and
chosen here (recorded in the stats): the target modules (all seven decoder linears), AdamW,
batch size 4 sequences, 1024 steps (one pass over the 4096 windows), gradient-norm clip 1.0,
training windows drawn at random from the joined train text (seeded).

After training the adapters are merged into the base weights and the exact pruning mask (the
zeros of the base weights before fine-tuning) is re-applied: merging alone would make every
pruned weight non-zero again (SPEC §7). The boundary rotations are parameters of the model but
never trained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from denoiserotator import preemption
from denoiserotator.files.export import (
    folder_loaded_bytes,
    load_model,
    measured_sparsity,
    read_metadata,
    save_model,
    unwrap_model,
)
from denoiserotator.files.jsonio import write_json
from denoiserotator.files.modeling_denoiserotator import get_boundary_rotations
from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter
from denoiserotator.plan import costs, flops
from denoiserotator.settings import DTYPES, ComputeSettings, FinetuneDataSettings, LoraSettings

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# masks


def _zero_masks(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """Exact-zero masks of the seven decoder linears (kept on CPU: they are as large as the weights)."""
    adapter = get_adapter(unwrap_model(model))
    masks = {}
    for index in range(adapter.num_layers):
        layer = adapter.layer(index)
        for name in LINEAR_NAMES:
            weight = layer.linear(name).weight
            masks[(index, name)] = (weight.detach() == 0).cpu()
    return masks


def _reapply_masks(model: PreTrainedModel, masks: dict[tuple[int, str], torch.Tensor]) -> int:
    """Zero the masked entries again; returns how many of them the merge had made non-zero."""
    adapter = get_adapter(model)
    revived = 0
    with torch.no_grad():
        for (index, name), mask in masks.items():
            weight = adapter.layer(index).linear(name).weight
            mask = mask.to(weight.device)
            revived += int((weight[mask] != 0).sum())
            weight.masked_fill_(mask, 0)
    return revived


# ----------------------------------------------------------------------------------------------
# training


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mean_loss(model: nn.Module, ids: torch.Tensor, micro_batch_size: int) -> float:
    """Mean next-token loss over `ids` (eval mode, no dropout), weighted by sequences."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), micro_batch_size):
            chunk = ids[start : start + micro_batch_size].to(_device_of(model))
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * len(chunk)
    model.train(was_training)
    return total / len(ids)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Seeded shuffled passes over the n sequences, cut into `steps` batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    needed = steps * batch_size
    while len(order) < needed:
        order = torch.cat([order, torch.randperm(n, generator=generator)])
    return list(order[:needed].view(steps, batch_size))


def _curve_summary(losses: list[float], points: int = 100) -> dict[str, Any]:
    n = len(losses)
    tenth = max(1, n // 10)
    bucket = max(1, math.ceil(n / points))
    curve = [
        {"step": start + 1, "loss": sum(losses[start : start + bucket]) / len(losses[start : start + bucket])}
        for start in range(0, n, bucket)
    ]
    return {
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        "mean_first_10pct": sum(losses[:tenth]) / tenth,
        "mean_last_10pct": sum(losses[-tenth:]) / tenth,
        "bucket_steps": bucket,
        "curve": curve,
    }


class TrainingCheckpoint:
    """LoRA progress on disk, so a job stopped at its time limit resumes where it was: the
    adapters, AdamW's and the schedule's state, the RNG state (dropout) and the losses so far, in
    one file replaced atomically, keyed by the settings that change training and the training ids
    (a checkpoint of anything else is discarded). Written every `every_minutes` minutes and when
    SLURM's SIGTERM arrives (`preemption`)."""

    def __init__(self, folder: Path, key: str, every_minutes: float) -> None:
        self.path = Path(folder) / "training.pt"
        self.key = key
        self.every_seconds = 60.0 * every_minutes
        self.last = time.monotonic()

    @staticmethod
    def key_of(settings: LoraSettings, train_ids: torch.Tensor) -> str:
        identity = {k: v for k, v in settings.to_dict().items() if k != "gradient_checkpointing"}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
        digest.update(train_ids.numpy().tobytes())
        return digest.hexdigest()

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        if state.get("key") != self.key:
            log.info("discarding the LoRA checkpoint %s: it belongs to other settings or data", self.path)
            self.path.unlink()
            return None
        return state

    def due(self) -> bool:
        return self.every_seconds > 0 and time.monotonic() - self.last >= self.every_seconds

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".tmp")
        torch.save({"key": self.key, **state}, partial)
        os.replace(partial, self.path)
        self.last = time.monotonic()
        log.info("LoRA checkpoint after step %d in %s", state["step"], self.path)


def lora_finetune(
    model: PreTrainedModel,
    train_ids: torch.Tensor,
    settings: LoraSettings,
    progress: bool = True,
    checkpoint: TrainingCheckpoint | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Train LoRA adapters on `train_ids` (n, seqlen), merge them and restore the pruning mask.

    Returns the merged model (the same module tree as `model`, without peft wrappers) and stats:
    settings, measured sparsity before/after, loss on the first training batch before/after
    (eval mode), and a summary of the training-loss curve. With `checkpoint`, training resumes
    from it and is saved to it (`TrainingCheckpoint`); a resumed run equals an uninterrupted one.
    Raises preemption.Preempted after checkpointing when SIGTERM/SIGUSR1 arrives.
    """
    from peft import LoraConfig, get_peft_model

    if train_ids.ndim != 2 or len(train_ids) == 0:
        raise ValueError(f"train_ids must be (n, seqlen) with n > 0, got shape {tuple(train_ids.shape)}")
    train_ids = train_ids.long().cpu()
    micro = settings.micro_batch_size or settings.batch_size  # LoraSettings checks the multiple

    masks = _zero_masks(model)
    sparsity_before = measured_sparsity(model)
    boundary_before = get_boundary_rotations(model)
    probe = train_ids[: min(len(train_ids), settings.batch_size)]
    probe_loss_before = _mean_loss(model, probe, micro)

    torch.manual_seed(settings.seed)  # LoRA A matrices are initialised randomly
    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=get_adapter(unwrap_model(model)).lora_target_modules(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    # Only the adapters train: base weights, norms, embeddings and boundary rotations stay frozen.
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
    trainable = [param for param in peft_model.parameters() if param.requires_grad]
    if settings.gradient_checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    device = _device_of(peft_model)
    losses: list[float] = []
    adapters = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    batches = _batches(len(train_ids), settings.batch_size, settings.steps, settings.seed)
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        parameters = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name in adapters:
                parameters[name].copy_(saved["adapters"][name])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        losses = list(saved["losses"])
        log.info("resuming LoRA training after step %d of %d", len(losses), settings.steps)

    def training_state() -> dict[str, Any]:
        parameters = dict(peft_model.named_parameters())
        return {
            "step": len(losses),
            "adapters": {name: parameters[name].detach().to("cpu", copy=True) for name in adapters},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "losses": list(losses),
        }

    peft_model.train()
    bar = tqdm(
        batches[len(losses) :],
        desc="lora",
        disable=not progress or not sys.stderr.isatty(),
    )
    for indices in bar:
        if checkpoint is not None and (checkpoint.due() or preemption.requested()):
            checkpoint.save(training_state())
        preemption.check()
        batch = train_ids[indices]
        step_loss = 0.0
        for start in range(0, len(batch), micro):
            chunk = batch[start : start + micro].to(device)
            loss = peft_model(input_ids=chunk, labels=chunk, use_cache=False).loss * (len(chunk) / len(batch))
            loss.backward()
            step_loss += float(loss.detach())
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")
    peft_model.eval()
    if settings.gradient_checkpointing:
        peft_model.get_base_model().gradient_checkpointing_disable()

    merged = peft_model.merge_and_unload()
    revived = _reapply_masks(merged, masks)
    sparsity_after = measured_sparsity(merged)
    if sparsity_after["zeros"] != sparsity_before["zeros"]:
        raise RuntimeError(
            f"sparsity changed by fine-tuning: {sparsity_before['zeros']} -> {sparsity_after['zeros']} zeros"
        )
    for before, after in zip(boundary_before, get_boundary_rotations(merged), strict=True):
        if (before is None) != (after is None) or (before is not None and not torch.equal(before, after)):
            raise RuntimeError("a boundary rotation changed during fine-tuning")

    stats = {
        "settings": settings.to_dict(),
        "optimizer": "AdamW",
        "schedule": "linear with warm-up (transformers.get_linear_schedule_with_warmup)",
        "train_sequences": len(train_ids),
        "train_seqlen": int(train_ids.shape[1]),
        "trainable_parameters": sum(param.numel() for param in trainable),
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_after,
        "masked_entries_revived_by_merge": revived,
        "probe_sequences": len(probe),
        "probe_loss_before": probe_loss_before,
        "probe_loss_after": _mean_loss(merged, probe, micro),
        "train_loss": _curve_summary(losses),
    }
    return merged, stats


# ----------------------------------------------------------------------------------------------
# data and CLI


def training_ids(
    source: str, tokenizer: PreTrainedTokenizerBase, n_sequences: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(n, seqlen) training windows from a token-id file (.pt) or a denoiserotator.files.text text source.

    Text sources (e.g. "wikitext2", "json:/path/train.jsonl") are joined and `n_sequences` random
    windows of `seqlen` tokens are drawn (seeded); a .pt file (a calibration file or a bare tensor)
    is used as is, cut to `seqlen` columns and at most `n_sequences` rows.
    """
    if source.endswith(".pt"):
        payload = torch.load(source, map_location="cpu", weights_only=True)
        ids = payload["input_ids"] if isinstance(payload, dict) else payload
        ids = ids[:n_sequences, :seqlen].long()
        return ids, {"source": source, "kind": "token-ids", "shape": list(ids.shape)}
    from denoiserotator.files.text import calibration_ids

    ids, meta = calibration_ids(tokenizer, source, n_sequences, seqlen, seed, mode="joined", with_meta=True)
    return ids, meta


def plan_gpu_memory(
    model_dir: Path,
    settings: LoraSettings,
    data: FinetuneDataSettings,
    dtype: torch.dtype,
    gpu_bytes: float,
    device: str,
) -> LoraSettings:
    """LoRA trains the whole model on one GPU (no model parallelism here). From the folder's config
    and tensors (`costs.lora_gpu_bytes`, the memory model the job's request was checked with):
    the settings to train with, gradient checkpointing switched on when the activations would not
    fit otherwise. RuntimeError, before a 140 GB model is read, when even that does not fit."""
    from transformers import AutoConfig

    shape = flops.LayerShape.from_hf_config(AutoConfig.from_pretrained(str(model_dir)))
    loaded = folder_loaded_bytes(model_dir, dtype)

    def need(checkpointing: bool) -> float:
        return costs.lora_gpu_bytes(shape, loaded, settings, data.seqlen, dtype.itemsize, checkpointing)

    if settings.gradient_checkpointing or need(False) <= gpu_bytes:
        return settings
    if need(True) <= gpu_bytes:
        without, with_it = need(False) / 2**30, need(True) / 2**30
        log.info("gradient checkpointing on: LoRA needs %.1f GiB without it, %.1f GiB with it, "
                 "on %s (%.1f GiB)", without, with_it, device, gpu_bytes / 2**30)  # fmt: skip
        return settings.replace(gradient_checkpointing=True)
    raise RuntimeError(
        f"LoRA fine-tuning holds the whole model on one GPU: {loaded / 2**30:.1f} GiB of weights, "
        f"{need(True) / 2**30:.1f} GiB in all even with gradient checkpointing, do not fit {device} "
        f"({gpu_bytes / 2**30:.1f} GiB). Multi-GPU LoRA is not implemented; leave this model out "
        "of finetune.rows (docs/cluster.md)"
    )


def finetune_stage(
    model_dir: Path,
    out: Path,
    stats_path: Path,
    settings: LoraSettings,
    data: FinetuneDataSettings,
    compute: ComputeSettings,
) -> dict[str, Any]:
    """LoRA-train the saved (pruned) folder `model_dir` on `data`, merge, re-apply the mask, and
    write the folder `out` and the stats JSON `stats_path` (returned). On CUDA, gradient
    checkpointing is switched on when the memory model says the activations would not fit
    (`plan_gpu_memory`); RuntimeError before loading anything when the model cannot fit the one
    GPU it trains on."""
    device = compute.resolved_device()
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        settings = plan_gpu_memory(model_dir, settings, data, DTYPES[compute.dtype], total, device)
    model, tokenizer = load_model(model_dir, dtype=DTYPES[compute.dtype], device=device)
    ids, data_meta = training_ids(data.source, tokenizer, data.n_sequences, data.seqlen, settings.seed)
    # Outside the output folder: Snakemake removes a failed job's outputs, not this.
    checkpoint_dir = Path(out).parent / f".{Path(out).name}.training"
    checkpoint = TrainingCheckpoint(checkpoint_dir, TrainingCheckpoint.key_of(settings, ids),
                                    compute.checkpoint_every_minutes)  # fmt: skip
    with preemption.handle_signals():
        model, stats = lora_finetune(model, ids, settings, checkpoint=checkpoint)
    stats.update(model=str(model_dir), train=data_meta, dtype=compute.dtype)
    metadata = {key: value for key, value in read_metadata(model_dir).items() if key != "export"}
    metadata["finetune"] = {key: value for key, value in stats.items() if key != "train_loss"}
    save_model(model, tokenizer, out, metadata=metadata)
    write_json(stats_path, stats)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="LoRA recovery fine-tuning of a saved (pruned) model; keeps its sparsity exactly."
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder written by export.save_model")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged, re-masked model")
    parser.add_argument("--stats", type=Path, required=True, help="JSON file for the fine-tuning stats")
    LoraSettings.add_arguments(parser)
    FinetuneDataSettings.add_arguments(parser)
    ComputeSettings.add_arguments(parser, only=("device", "dtype"))
    args = parser.parse_args(argv)
    lora, data = LoraSettings.from_namespace(args), FinetuneDataSettings.from_namespace(args)
    finetune_stage(args.model, args.out, args.stats, lora, data, ComputeSettings.from_namespace(args))


if __name__ == "__main__":
    main()
