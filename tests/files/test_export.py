"""Saving and loading rotated and pruned models: exact round trips, strictness, stock-tool loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from denoiserotator.files.export import (
    METADATA_FILE,
    LoadingError,
    folder_loaded_bytes,
    folder_parameter_count,
    gpu_device_map,
    load_model,
    measured_sparsity,
    read_metadata,
    save_model,
)
from denoiserotator.files.modeling_denoiserotator import (
    BOUNDARY_ATTR,
    attach_boundary_rotations,
    get_boundary_rotations,
)
from denoiserotator.method.adapters import LINEAR_NAMES, get_adapter
from denoiserotator.method.rotation.fuse import (
    fold_layer_norms,
    fuse_layer_rotation,
    merge_boundary_rotations,
)
from denoiserotator.testing import FAMILIES, tiny_model, tiny_tokenizer


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(
        torch.randn(size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.diagonal(r))


def token_ids(seed: int = 3, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


def rotated_equivalent(family: str, tie: bool = False) -> tuple[torch.nn.Module, list, torch.Tensor]:
    """A model with random per-layer rotations fused and merged into boundaries, its boundary list,
    and the logits of the original model (which the rotated one must reproduce)."""
    model = tiny_model(family, num_layers=3, tie=tie)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    adapter = get_adapter(model)
    rotations = []
    for index in range(adapter.num_layers):
        view = adapter.layer(index)
        fold_layer_norms(view)
        rotation = random_orthogonal(adapter.hidden_size, seed=10 + index)
        fuse_layer_rotation(view, rotation, None, adapter.num_heads)
        rotations.append(rotation)
    boundary = merge_boundary_rotations(adapter, rotations)
    return model, boundary, expected


@pytest.mark.parametrize("family", FAMILIES)
def test_attached_boundaries_reproduce_the_unrotated_model(family: str) -> None:
    model, boundary, expected = rotated_equivalent(family)
    with torch.no_grad():
        without = model(token_ids()).logits
        attach_boundary_rotations(model, boundary)
        actual = model(token_ids()).logits
    assert type(model).__name__.startswith("Rotated")
    assert (without - expected).abs().max() > 1e-2  # the boundaries are needed ...
    assert (actual - expected).abs().max() <= 1e-4  # ... and applied exactly where they belong


def test_identity_boundaries_change_nothing_and_a_rotation_does() -> None:
    model = tiny_model("llama", num_layers=2)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
        attach_boundary_rotations(model, [torch.eye(64), torch.eye(64)])
        assert torch.equal(model(ids).logits, expected)
        attach_boundary_rotations(model, [None, random_orthogonal(64, 0)])
        assert (model(ids).logits - expected).abs().max() > 1e-2
        # Replacing again drops the old modules and their hooks.
        attach_boundary_rotations(model, [None, None])
        assert torch.equal(model(ids).logits, expected)
    assert not any(BOUNDARY_ATTR in key for key in model.state_dict())


def test_hook_handles_hidden_states_passed_by_keyword() -> None:
    model = tiny_model("llama", num_layers=1)
    matrix = random_orthogonal(64, 1).float()
    layer = get_adapter(model).layers[0]
    h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5)[None]
    embeddings = model.model.rotary_emb(h, positions)
    with torch.no_grad():
        expected = layer(h @ matrix, position_embeddings=embeddings, position_ids=positions)
        attach_boundary_rotations(model, [matrix])
        positional = layer(h, position_embeddings=embeddings, position_ids=positions)
        keyword = layer(hidden_states=h, position_embeddings=embeddings, position_ids=positions)
    expected, positional, keyword = (
        x[0] if isinstance(x, tuple) else x for x in (expected, positional, keyword)
    )
    # The hook rotates through the boundary module (F.linear with the transposed matrix), the
    # expectation through `h @ matrix`: two fp32 matmul paths whose summation order depends on
    # the BLAS kernel and the thread count, so they agree to fp32 rounding, not bit for bit.
    fp32 = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(positional, expected, **fp32)
    torch.testing.assert_close(keyword, expected, **fp32)
    # Positional and keyword calls run the same computation: those must agree exactly.
    assert torch.equal(positional, keyword)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_exact_via_our_api_and_stock_transformers(
    family: str, tmp_path: Path
) -> None:
    model, boundary, expected = rotated_equivalent(family)
    ids = token_ids()
    folder = tmp_path / f"rotated-{family}"
    save_model(model, tiny_tokenizer(), folder, boundary=boundary, metadata={"pruner": "none"})
    with torch.no_grad():
        in_memory = model(ids).logits
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0].startswith("Rotated")
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_denoiserotator.Rotated")
    assert config["denoiserotator_boundary_layers"] == [1, 2]
    assert config["tie_word_embeddings"] is False
    assert (folder / "modeling_denoiserotator.py").exists()
    assert read_metadata(folder)["pruner"] == "none"
    assert read_metadata(folder)["export"]["boundary_layers"] == [1, 2]

    ours, tokenizer = load_model(folder)
    stock = AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=True, dtype=torch.float32
    ).eval()
    assert type(stock).__module__.startswith("transformers_modules")  # the folder's own copy of the code
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, in_memory)
        assert torch.equal(stock(ids).logits, in_memory)
    assert (in_memory - expected).abs().max() <= 1e-4
    for loaded, original in zip(get_boundary_rotations(ours), boundary, strict=True):
        assert (loaded is None) == (original is None)
        if original is not None:
            assert torch.equal(loaded, original.float())
    assert tokenizer("it was the best").input_ids == tiny_tokenizer()("it was the best").input_ids


def test_plain_model_saves_a_plain_folder(tmp_path: Path) -> None:
    model = tiny_model("qwen2", num_layers=2)
    save_model(model, tiny_tokenizer(), tmp_path / "plain", boundary=[None, None])
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert "auto_map" not in config and "denoiserotator_boundary_layers" not in config
    assert not (tmp_path / "plain" / "modeling_denoiserotator.py").exists()
    loaded, _ = load_model(tmp_path / "plain")
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)


def test_untied_embeddings_stay_untied(tmp_path: Path) -> None:
    model, boundary, expected = rotated_equivalent("llama", tie=True)  # merging unties lm_head
    model.config.tie_word_embeddings = True  # a caller that forgot to update the config
    save_model(model, tiny_tokenizer(), tmp_path / "m", boundary=boundary)
    loaded, _ = load_model(tmp_path / "m")
    adapter = get_adapter(loaded)
    assert not adapter.tied_embeddings
    assert not torch.equal(adapter.lm_head.weight, adapter.embedding.weight)
    with torch.no_grad():
        assert (loaded(token_ids()).logits - expected).abs().max() <= 1e-4


def test_tied_model_round_trips(tmp_path: Path) -> None:
    model = tiny_model("llama", num_layers=2, tie=True)
    save_model(model, tiny_tokenizer(), tmp_path / "tied")
    loaded, _ = load_model(tmp_path / "tied")
    assert get_adapter(loaded).tied_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(token_ids()).logits, model(token_ids()).logits)


@pytest.mark.parametrize(
    "dropped", ["model.layers.1.denoiserotator_boundary.weight", "model.layers.0.mlp.up_proj.weight"]
)
def test_loading_a_folder_with_a_missing_tensor_fails_loudly(dropped: str, tmp_path: Path) -> None:
    model, boundary, _ = rotated_equivalent("llama")
    folder = tmp_path / "m"
    save_model(model, tiny_tokenizer(), folder, boundary=boundary)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[dropped]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadingError, match=dropped.replace(".", r"\.")):
        load_model(folder)


def test_loading_a_folder_with_an_extra_tensor_fails_loudly(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_model(tiny_model("llama", num_layers=2), tiny_tokenizer(), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadingError, match="extra"):
        load_model(folder)


def test_save_overwrites_atomically_and_leaves_no_temporaries(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_model(
        tiny_model("llama", seed=1, num_layers=2), tiny_tokenizer(), folder, boundary=[None, torch.eye(64)]
    )
    second = tiny_model("llama", seed=2, num_layers=2)
    save_model(second, tiny_tokenizer(), folder, boundary=[None, None])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert not (folder / "modeling_denoiserotator.py").exists()  # nothing stale from the first save
    loaded, _ = load_model(folder)
    assert torch.equal(
        get_adapter(loaded).layer(0).linear("q").weight, get_adapter(second).layer(0).linear("q").weight
    )


def test_measured_sparsity_counts_exact_zeros_and_reads_through_peft() -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_model("mistral", num_layers=2)
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.layer(0).linear("q").weight[:, :16] = 0  # 16/64 of one of the two q matrices
        adapter.layer(1).linear("down").weight.zero_()
    result = measured_sparsity(model)
    assert result["per_linear"]["q"] == pytest.approx(16 / 64 / 2)
    assert result["per_linear"]["down"] == pytest.approx(0.5)
    assert result["per_linear"]["k"] == 0.0
    sizes = {name: adapter.layer(0).linear(name).weight.numel() for name in LINEAR_NAMES}
    zeros = 64 * 16 + sizes["down"]
    assert result["overall"] == pytest.approx(zeros / (2 * sum(sizes.values())))

    wrapped = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    assert measured_sparsity(wrapped) == result


TASK_YAML = """\
include: {arc_yaml}
task: tiny_local_arc
tag: []
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {data}
    validation: {data}
    test: {data}
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_eval_command_line_evaluates_a_rotated_folder(family: str, tmp_path: Path) -> None:
    import lm_eval.tasks

    original = tiny_model(family, num_layers=3)
    model, boundary, _ = rotated_equivalent(family)
    folder = tmp_path / "rotated"
    save_model(model, tiny_tokenizer(), folder, boundary=boundary)

    data = tmp_path / "arc.jsonl"
    questions = [
        "Which is the season of Light?",
        "Who said call me Ishmael?",
        "What was the age of wisdom?",
        "Which body lays taxes?",
        "What is in my purse?",
    ]
    with data.open("w") as handle:
        for index, question in enumerate(questions):
            choices = {
                "text": ["it was", "the Congress", "the world", "no money"],
                "label": ["A", "B", "C", "D"],
            }
            handle.write(
                json.dumps(
                    {
                        "id": str(index),
                        "question": question,
                        "choices": choices,
                        "answerKey": "ABCD"[index % 4],
                    }
                )
                + "\n"
            )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    arc_yaml = Path(lm_eval.tasks.__file__).parent / "arc" / "arc_easy.yaml"
    (tasks / "tiny_local_arc.yaml").write_text(TASK_YAML.format(arc_yaml=arc_yaml, data=data))

    out = tmp_path / "results"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
    }
    lm_eval_cli = Path(sys.executable).parent / "lm_eval"
    command = [
        str(lm_eval_cli),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={folder},trust_remote_code=True,dtype=float32",
        "--tasks",
        "tiny_local_arc",
        "--include_path",
        str(tasks),
        "--limit",
        "5",
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results_files = list(out.rglob("results*.json"))
    assert len(results_files) == 1
    metrics = json.loads(results_files[0].read_text())["results"]["tiny_local_arc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0
    assert json.loads(results_files[0].read_text())["n-samples"]["tiny_local_arc"]["effective"] == 5

    # lm-eval must have run the rotated model with its boundaries: its log-likelihoods equal
    # those of the original, unrotated model (to fp32 rounding).
    tokenizer = tiny_tokenizer()
    samples = [
        json.loads(line) for path in out.rglob("samples_tiny_local_arc*.jsonl") for line in path.open()
    ]
    assert len(samples) == 5
    for sample in samples:
        for arguments, response in zip(sample["arguments"].values(), sample["filtered_resps"], strict=True):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            whole = tokenizer(context + continuation).input_ids
            n_context = len(tokenizer(context).input_ids)
            with torch.no_grad():
                logprobs = torch.log_softmax(original(torch.tensor([whole])).logits[0].double(), dim=-1)
            expected = sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole)))
            assert float(response[0]) == pytest.approx(expected, abs=1e-3)


def test_metadata_file_is_written(tmp_path: Path) -> None:
    model = tiny_model("llama", num_layers=2)
    save_model(model, None, tmp_path / "m", metadata={"sparsity": "50%"})
    record = json.loads((tmp_path / "m" / METADATA_FILE).read_text())
    assert record["sparsity"] == "50%"
    assert record["export"]["measured_sparsity"]["overall"] == 0.0


def test_boundaries_stay_fp32_in_a_bfloat16_model(tmp_path: Path) -> None:
    model, boundary, expected = rotated_equivalent("qwen2")
    save_model(model, tiny_tokenizer(), tmp_path / "m", boundary=boundary)
    for loaded in (
        load_model(tmp_path / "m", dtype=torch.bfloat16)[0],
        AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "m"), trust_remote_code=True, dtype=torch.bfloat16
        ),
    ):
        assert get_adapter(loaded).layer(1).linear("q").weight.dtype == torch.bfloat16
        assert all(m.dtype == torch.float32 for m in get_boundary_rotations(loaded) if m is not None)
        assert torch.equal(get_boundary_rotations(loaded)[2], boundary[2].float())
        with torch.no_grad():
            logits = loaded(token_ids()).logits
        assert logits.dtype == torch.bfloat16
        assert (logits.float() - expected).abs().max() < 0.25
    in_memory = tiny_model("llama", num_layers=2).to(torch.bfloat16)
    attach_boundary_rotations(in_memory, [None, random_orthogonal(64, 0)])
    assert get_boundary_rotations(in_memory)[1].dtype == torch.float32


def test_gemma3_output_norms_are_rebuilt_on_load_and_stay_fp32_in_bfloat16(tmp_path: Path) -> None:
    model, boundary, expected = rotated_equivalent("gemma3_text")
    save_model(model, tiny_tokenizer(), tmp_path / "g", boundary=boundary)
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    assert config["denoiserotator_output_norm_layers"] == [0, 1, 2]
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.25)):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", trust_remote_code=True, dtype=dtype)
        norm = loaded.model.layers[1].post_feedforward_layernorm
        assert type(norm).__name__ == "RotatedOutputNorm" and norm.weight.shape == (64, 64)
        assert norm.weight.dtype == torch.float32
        with torch.no_grad():
            logits = loaded.eval()(token_ids()).logits
        assert logits.dtype == dtype and (logits.float() - expected).abs().max() < tolerance


def test_cli_reports_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from denoiserotator.files.export import main

    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        get_adapter(model).layer(0).linear("up").weight.zero_()
    save_model(model, tiny_tokenizer(), tmp_path / "m", boundary=[None, random_orthogonal(64, 0)])
    main(["--model", str(tmp_path / "m"), "--json", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(capsys.readouterr().out)
    assert report["class"] == "RotatedLlamaForCausalLM" and report["boundary_layers"] == [1]
    assert report["measured_sparsity"]["per_linear"]["up"] == 0.5


def _pruned(family: str, seed: int) -> torch.nn.Module:
    """A tiny model with a different fraction of exact zeros in every decoder linear."""
    model = tiny_model(family, seed=seed, num_layers=3)
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index in range(adapter.num_layers):
            for k, name in enumerate(LINEAR_NAMES):
                weight = adapter.layer(index).linear(name).weight
                weight[torch.rand(weight.shape, generator=generator) < 0.1 * (k + index) / 3] = 0
    return model


@pytest.mark.parametrize(("family", "rotated", "shards"), [
    ("llama", False, False), ("qwen2", True, False), ("mistral", True, True),
])  # fmt: skip
def test_folder_sparsity_streams_and_equals_the_model_count(
    family: str, rotated: bool, shards: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claim: the sparsity read tensor by tensor from the safetensors equals the count on the loaded
    model (overall, per linear, zeros, total), for plain, rotated and sharded folders, and is
    computed without building a model (every model constructor raises while it runs)."""
    import transformers

    from denoiserotator import tables
    from denoiserotator.files.export import folder_sparsity

    model = _pruned(family, seed=7)
    folder = tmp_path / "m"
    boundary = [random_orthogonal(64, 1).float(), None, None] if rotated else None
    save_model(model, tiny_tokenizer(), folder, boundary=boundary)
    if shards:  # rewrite the weights as several shards with an index
        (folder / "model.safetensors").unlink()
        model.save_pretrained(folder, max_shard_size="50KB")
        assert (folder / "model.safetensors.index.json").exists()
    expected = measured_sparsity(load_model(folder)[0])
    assert 0 < expected["overall"] < 1

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was instantiated")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)
    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    assert folder_sparsity(folder) == expected
    out = tmp_path / "sparsity.json"
    assert tables.write_sparsity(folder, out) == {"model": str(folder), **expected}
    assert json.loads(out.read_text())["overall"] == expected["overall"]


def test_folder_sparsity_refuses_a_folder_without_a_layer(tmp_path: Path) -> None:
    """Claim: a decoder linear missing from the files is an error, not a count over fewer weights."""
    from denoiserotator.files.export import folder_sparsity

    folder = tmp_path / "m"
    save_model(tiny_model("llama"), None, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadingError, match="up_proj"):
        folder_sparsity(folder)


def test_loaded_bytes_count_the_boundaries_in_fp32(tmp_path: Path) -> None:
    """A GPU request sized at parameters × 2 B for a bf16 model misses the boundary matrices, which
    load in fp32: the folder's bytes are read per tensor in the dtype each one loads in."""
    model, boundary, _ = rotated_equivalent("llama")
    save_model(model, tiny_tokenizer(), tmp_path / "m", boundary=boundary)
    loaded = load_model(tmp_path / "m", dtype=torch.bfloat16)[0]
    in_memory = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert folder_loaded_bytes(tmp_path / "m", torch.bfloat16) == in_memory
    assert in_memory > folder_parameter_count(tmp_path / "m") * 2  # what the old sizing counted
    assert folder_loaded_bytes(tmp_path / "m", torch.float32) == folder_parameter_count(tmp_path / "m") * 4


def test_a_device_map_that_would_offload_is_refused_before_loading(tmp_path: Path) -> None:
    """accelerate puts what does not fit the GPUs on "cpu"/"disk", where a 70B evaluation runs
    until its time limit: the map is planned on a meta model first and refused, naming the modules;
    a map that fits keeps whole decoder layers on the GPUs, boundaries counted in fp32."""
    model, boundary, _ = rotated_equivalent("llama")
    save_model(model, tiny_tokenizer(), tmp_path / "m", boundary=boundary)
    need = folder_loaded_bytes(tmp_path / "m", torch.bfloat16)
    fits = gpu_device_map(tmp_path / "m", torch.bfloat16, {0: need, 1: need})
    assert set(fits.values()) <= {0, 1}
    assert not any(".self_attn" in name or ".mlp" in name for name in fits)  # layers are not split
    with pytest.raises(RuntimeError, match=r"would not fit the 2 device\(s\) and go to \['(cpu|disk)'"):
        gpu_device_map(tmp_path / "m", torch.bfloat16, {0: need // 4, 1: need // 4})


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 5e5,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def test_llama31_rope_scaling_survives_rotation_and_export_beyond_the_original_context(
    tmp_path: Path,
) -> None:
    """LLaMA-3.1/3.2/3.3 (`rope_type: llama3`): a rotation-only run, exported and reloaded by stock
    transformers, equals the dense model at positions past `original_max_position_embeddings`,
    and the scaling really acts there (the same weights with plain RoPE differ)."""
    from denoiserotator.method.sequential import PruneSettings, run_pipeline
    from denoiserotator.settings import RotationSettings

    def llama31(rope: dict) -> torch.nn.Module:
        return tiny_model("llama", num_layers=2, max_position_embeddings=256, rope_parameters=dict(rope))

    dense = llama31(LLAMA31_ROPE)
    long_ids = torch.randint(3, 384, (1, 160), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = dense(long_ids).logits
        plain_rope = llama31({"rope_type": "default", "rope_theta": 5e5})(long_ids).logits
    assert (plain_rope[0, 40:] - expected[0, 40:]).abs().max() > 1e-2

    calibration_ids = torch.randint(3, 384, (4, 48), generator=torch.Generator().manual_seed(12))
    rotation = RotationSettings(steps=10, loss_score="wanda")
    settings = PruneSettings(pruner="none", pattern=None, rotation=rotation)
    result = run_pipeline(llama31(LLAMA31_ROPE), calibration_ids, settings, progress=False)
    folder = tmp_path / "llama31-rotated"
    save_model(result.model, tiny_tokenizer(), folder, boundary=result.boundary)
    assert json.loads((folder / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"
    stock = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        actual = stock.eval()(long_ids).logits
    assert (actual[0, 32:] - expected[0, 32:]).abs().max() <= 1e-4 * expected.abs().max()
