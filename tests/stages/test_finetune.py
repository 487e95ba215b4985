"""LoRA fine-tuning keeps the exact pruning mask and the boundary rotations, and learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from denoiserotator.files.export import load_model, measured_sparsity, read_metadata, save_model
from denoiserotator.files.modeling_denoiserotator import attach_boundary_rotations, get_boundary_rotations
from denoiserotator.files.text import save_calibration
from denoiserotator.finetune import lora_finetune, main, training_ids
from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter
from denoiserotator.settings import LoraSettings
from denoiserotator.testing import FAMILIES, tiny_model, tiny_tokenizer


def pruned_rotated_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny model with a random boundary rotation and half of every decoder linear zeroed."""
    model = tiny_model(family, seed=seed, num_layers=2)
    generator = torch.Generator().manual_seed(seed + 7)
    rotation = torch.linalg.qr(torch.randn(64, 64, generator=generator)).Q
    attach_boundary_rotations(model, [None, rotation])
    adapter = get_adapter(model)
    with torch.no_grad():
        for index in range(adapter.num_layers):
            for name in LINEAR_NAMES:
                weight = adapter.layer(index).linear(name).weight
                keep = torch.rand(weight.shape, generator=generator) >= 0.5
                weight.mul_(keep)
    return model


def zero_masks(model: torch.nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    adapter = get_adapter(model)
    return {
        (i, name): adapter.layer(i).linear(name).weight.detach() == 0
        for i in range(adapter.num_layers)
        for name in LINEAR_NAMES
    }


def train_batch(n: int = 4, length: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 384, (n, length), generator=torch.Generator().manual_seed(seed))


def loss_on(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_keeps_the_exact_mask_and_boundaries_and_lowers_the_loss(family: str) -> None:
    model = pruned_rotated_model(family)
    ids = train_batch()
    masks_before = zero_masks(model)
    weights_before = {
        key: get_adapter(model).layer(key[0]).linear(key[1]).weight.detach().clone() for key in masks_before
    }
    boundary_before = get_boundary_rotations(model)
    loss_before = loss_on(model, ids)

    settings = LoraSettings(
        steps=25, batch_size=4, micro_batch_size=2, warmup_steps=3, lr=1e-2, dropout=0.0, seed=0
    )
    merged, stats = lora_finetune(model, ids, settings, progress=False)

    assert not hasattr(merged, "peft_config")
    assert type(merged).__name__.startswith("Rotated")
    masks_after = zero_masks(merged)
    changed = 0
    for key, mask in masks_before.items():
        assert torch.equal(masks_after[key], mask), key
        changed += int((get_adapter(merged).layer(key[0]).linear(key[1]).weight != weights_before[key]).sum())
    assert changed > 0  # the adapters were really merged into the kept weights
    assert stats["masked_entries_revived_by_merge"] > 0  # ... and merging alone would have lost the mask
    for before, after in zip(boundary_before, get_boundary_rotations(merged), strict=True):
        assert (before is None and after is None) or torch.equal(before, after)

    loss_after = loss_on(merged, ids)
    assert loss_after < loss_before - 0.1
    assert stats["probe_loss_before"] == pytest.approx(loss_before, rel=1e-5)
    assert stats["probe_loss_after"] == pytest.approx(loss_after, rel=1e-5)
    assert stats["train_loss"]["mean_last_10pct"] < stats["train_loss"]["mean_first_10pct"]
    assert len(stats["train_loss"]["curve"]) == 25
    assert stats["sparsity_before"] == stats["sparsity_after"] == measured_sparsity(merged)
    assert 0.45 < stats["sparsity_after"]["overall"] < 0.55
    # r * (in + out) per adapted linear, seven linears, two layers
    dims = {
        "q": (64, 64),
        "k": (64, 32),
        "v": (64, 32),
        "o": (64, 64),
        "gate": (64, 96),
        "up": (64, 96),
        "down": (96, 64),
    }
    assert stats["trainable_parameters"] == 2 * sum(8 * (i + o) for i, o in dims.values())


def test_training_ids_from_token_file_and_text(tmp_path: Path) -> None:
    ids = train_batch(n=6, length=30)
    save_calibration(tmp_path / "ids.pt", ids, {"source": "test"})
    loaded, meta = training_ids(str(tmp_path / "ids.pt"), tiny_tokenizer(), n_sequences=4, seqlen=20, seed=0)
    assert torch.equal(loaded, ids[:4, :20])
    torch.save(ids, tmp_path / "bare.pt")
    assert torch.equal(training_ids(str(tmp_path / "bare.pt"), tiny_tokenizer(), 10, 30, 0)[0], ids)

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": f"It was the best of times, number {i}."}) + "\n" for i in range(40))
    )
    first, _ = training_ids(f"json:{jsonl}", tiny_tokenizer(), n_sequences=3, seqlen=16, seed=1)
    second, _ = training_ids(f"json:{jsonl}", tiny_tokenizer(), n_sequences=3, seqlen=16, seed=1)
    assert first.shape == (3, 16) and torch.equal(first, second)


def test_cli_writes_a_masked_loadable_model_and_stats(tmp_path: Path) -> None:
    model = pruned_rotated_model()
    source = tmp_path / "pruned"
    save_model(model, tiny_tokenizer(), source, metadata={"pruner": "wanda", "sparsity": "50%"})
    ids_file = tmp_path / "train.pt"
    save_calibration(ids_file, train_batch(n=4, length=24), {"source": "test"})
    out, stats_file = tmp_path / "tuned", tmp_path / "stats.json"
    main(
        [
            "--model",
            str(source),
            "--source",
            str(ids_file),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seqlen",
            "24",
            "--warmup-steps",
            "1",
            "--out",
            str(out),
            "--stats",
            str(stats_file),
        ]
    )

    tuned, _ = load_model(out)
    original, _ = load_model(source)
    for key, mask in zero_masks(original).items():
        assert torch.equal(zero_masks(tuned)[key], mask)
    assert torch.equal(get_boundary_rotations(tuned)[1], get_boundary_rotations(original)[1])
    stats = json.loads(stats_file.read_text())
    assert stats["sparsity_after"]["zeros"] == stats["sparsity_before"]["zeros"]
    assert stats["settings"]["steps"] == 4 and stats["train"]["shape"] == [4, 24]
    metadata = read_metadata(out)
    assert metadata["pruner"] == "wanda" and metadata["finetune"]["settings"]["r"] == 8
    assert metadata["export"]["measured_sparsity"]["zeros"] == stats["sparsity_before"]["zeros"]


def test_lora_gpu_memory_switches_on_checkpointing_or_refuses_before_loading(
    tmp_path: Path, monkeypatch
) -> None:
    """LoRA trains on one GPU. From the folder's config and tensors (the memory model the plan
    used): a GPU that holds the model only with gradient checkpointing gets it switched on; one
    too small even then fails in one line naming the sizes, before any weight is read."""
    from types import SimpleNamespace

    from denoiserotator import finetune
    from denoiserotator.plan import costs, flops
    from denoiserotator.settings import ComputeSettings, FinetuneDataSettings

    source = tmp_path / "pruned"
    save_model(tiny_model("llama"), tiny_tokenizer(), source)
    data = FinetuneDataSettings(seqlen=64)
    shape = flops.LayerShape.from_hf_config(tiny_model("llama").config)
    loaded = finetune.folder_loaded_bytes(source, torch.float32)
    plain, checkpointed = (
        costs.lora_gpu_bytes(shape, loaded, LoraSettings(), 64, 4, c) for c in (False, True)
    )
    assert checkpointed < plain
    trained_with = []

    def loading(*args, **kwargs):
        raise AssertionError("loaded")

    def planning(*args, **kwargs):
        chosen = real_plan(*args, **kwargs)
        trained_with.append(chosen.gradient_checkpointing)
        return chosen

    real_plan = finetune.plan_gpu_memory
    monkeypatch.setattr(finetune, "load_model", loading)
    monkeypatch.setattr(finetune, "plan_gpu_memory", planning)
    for total, expected, checkpointing in (
        (checkpointed - 1, "do not fit cuda", None),
        ((checkpointed + plain) / 2, "loaded", True),
        (plain + 1, "loaded", False),
    ):
        properties = SimpleNamespace(total_memory=total)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i, p=properties: p)
        with pytest.raises((RuntimeError, AssertionError), match=expected):
            finetune.finetune_stage(
                source, tmp_path / "out", tmp_path / "stats.json", LoraSettings(),
                data, ComputeSettings(device="cuda", dtype="float32"),
            )  # fmt: skip
        if checkpointing is not None:
            assert trained_with[-1] is checkpointing


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_lora_memory_model_matches_what_autograd_saves(checkpointing: bool) -> None:
    """`flops.lora_saved_bytes` (fitted by bench/lora_memory.py on other shapes) against the bytes
    autograd saves for backward on shapes it was not fitted on: within 10 %, never below by more
    than 2 % (a request must not be short)."""
    from denoiserotator.plan import flops
    from denoiserotator.testing import lora_saved_bytes, sized_llama

    for hidden, intermediate, heads, layers, vocab, seqlen in (
        (96, 224, 6, 3, 512, 48),
        (160, 384, 4, 2, 640, 40),
    ):
        model = sized_llama(hidden, intermediate, heads, layers, vocab)
        ids = torch.randint(0, vocab, (2, seqlen), generator=torch.Generator().manual_seed(0))
        measured = lora_saved_bytes(model, ids, checkpointing)
        modelled = flops.lora_saved_bytes(
            flops.LayerShape.from_hf_config(model.config), ids.numel(), 4, checkpointing
        )
        assert 0.90 < measured / modelled < 1.02, (hidden, intermediate, measured, modelled)


def test_lora_rows_that_no_gpu_holds_are_refused_at_planning() -> None:
    """The paper grid's 32B (fp32), 70B and 72B models cannot be LoRA-trained on one A100-80G even
    with checkpointing: refused when planned, with the reason; 8B and 14B (checkpointing) fit."""
    from denoiserotator.plan import costs
    from denoiserotator.plan.cluster import Partition, Site
    from denoiserotator.plan.experiment import Experiment
    from tests.plan.test_experiment import load

    exp, site = Experiment(load("config.yaml")), Site((Partition("gpu", None, None, 8),), "test")
    for model in ("qwen2.5-32b", "llama3-70b", "qwen2.5-72b"):
        with pytest.raises(costs.ResourceLimitError, match="multi-GPU LoRA is not implemented"):
            costs.job_request(exp, model, "finetune", rotated=True, site=site)
    for model in ("llama3-8b", "qwen2.5-14b"):
        assert costs.job_request(exp, model, "finetune", rotated=True, site=site).gpus == 1
    assert costs.finetune_gpu_bytes(exp, "qwen2.5-14b", True, False) > 80 * 2**30  # needs checkpointing


def test_lora_stopped_by_sigterm_resumes_from_its_checkpoint_to_the_same_model(
    tmp_path: Path, monkeypatch
) -> None:
    """A LoRA job stopped by SLURM's SIGTERM writes its training state (adapters, AdamW, schedule,
    dropout RNG, losses) and stops; the retry resumes after the steps done, and the merged model
    and loss curve equal an uninterrupted run's bit for bit. A checkpoint of other settings is
    discarded."""
    import os
    import signal

    from denoiserotator import finetune
    from denoiserotator.preemption import Preempted, handle_signals

    ids = train_batch()
    settings = LoraSettings(
        steps=8, batch_size=4, micro_batch_size=2, warmup_steps=2, lr=1e-2, dropout=0.1, seed=0
    )
    reference, reference_stats = lora_finetune(pruned_rotated_model("llama"), ids, settings, progress=False)

    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def clip_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # during step 3, as slurmstepd sends it
        return real_clip(*args, **kwargs)

    def checkpoint() -> finetune.TrainingCheckpoint:
        return finetune.TrainingCheckpoint(tmp_path, finetune.TrainingCheckpoint.key_of(settings, ids), 0)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_signal)
        with handle_signals(), pytest.raises(Preempted):
            lora_finetune(
                pruned_rotated_model("llama"), ids, settings, progress=False, checkpoint=checkpoint()
            )
    assert torch.load(tmp_path / "training.pt", weights_only=False)["step"] == 3

    steps_run: list[int] = []

    def counting_clip(*args, **kwargs):
        steps_run.append(1)
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counting_clip)
    resumed, stats = lora_finetune(
        pruned_rotated_model("llama"), ids, settings, progress=False, checkpoint=checkpoint()
    )
    assert len(steps_run) == settings.steps - 3  # resumed after the 3 steps done, not from scratch
    assert stats["train_loss"] == reference_stats["train_loss"]
    for expected, actual in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(expected, actual)

    other = settings.replace(lr=5e-3)
    stale = finetune.TrainingCheckpoint(tmp_path, finetune.TrainingCheckpoint.key_of(other, ids), 0)
    assert stale.load() is None and not (tmp_path / "training.pt").exists()
