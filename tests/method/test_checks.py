"""Failures named at their cause, before work is spent (checks.py).

- Non-finite inputs (an inf embedding row, an fp16 overflow inside a layer, a corrupt weight)
  raise NonFiniteError naming the layer input / linear statistics / weight, before any
  rotation is trained or any weight pruned, and the prune stage writes nothing.
- Every setting that can be checked against the model is checked before calibration
  activations are captured; the error names the setting, where it applies and what is allowed.
- The Snakemake schema and the package agree on the bounds of the settings they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import denoiserotator.method.sequential as pipeline
from denoiserotator.files.text import save_calibration
from denoiserotator.method.checks import NonFiniteError, SettingError
from denoiserotator.method.pruners import PRUNERS
from denoiserotator.prune import prune_stage
from denoiserotator.settings import ComputeSettings, PruningSettings, RotationSettings, SettingsError
from denoiserotator.testing import tiny_model, tiny_tokenizer

PLANTED = (1, 5)  # (sample, token) of the calibration token whose embedding row holds an inf


ROTATION_KEYS = ("steps", "lr", "clip", "loss_variant", "loss_score")
PRUNING_KEYS = ("percdamp", "sparsegpt_blocksize")
COMPUTE_KEYS = ("device", "dtype", "prune_batch_size")


def _settings(pruner: str = "wanda", pattern: str | None = "50%", rotation: str = "denoise", **flat: Any):
    """A PruneSettings from flat keyword arguments, each routed to its section."""

    def pick(keys: tuple[str, ...]) -> dict[str, Any]:
        return {key: flat[key] for key in keys if key in flat}

    return pipeline.PruneSettings(
        pruner=pruner,
        pattern=pattern,
        rotation=RotationSettings.from_mapping(pick(ROTATION_KEYS)) if rotation == "denoise" else None,
        pruning=PruningSettings.from_mapping(pick(PRUNING_KEYS)),
        compute=ComputeSettings.from_mapping(pick(COMPUTE_KEYS)),
    )


def _ids(samples: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 384, (samples, length), generator=torch.Generator().manual_seed(0))


def _forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work was spent on non-finite inputs")

    monkeypatch.setattr(pipeline, "train_rotation", forbidden)
    monkeypatch.setattr(pipeline, "prune_weight", forbidden)


@pytest.fixture(scope="module")
def inf_embedding_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp("inf")
    ids = _ids()
    token = int(ids[PLANTED])
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[token, 7] = float("inf")
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    save_calibration(root / "calib.pt", ids, {"source": "test"})
    return root / "model", root / "calib.pt", token


@pytest.mark.parametrize("rotation", ["none", "denoise"])
@pytest.mark.parametrize("pruner", PRUNERS)
def test_an_inf_embedding_is_named_before_any_rotation_or_pruning(
    pruner: str,
    rotation: str,
    inf_embedding_inputs: tuple[Path, Path, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir, calib, token = inf_embedding_inputs
    _forbid_work(monkeypatch)
    settings = _settings(pruner=pruner, pattern="2:4", rotation=rotation, steps=3)
    out, stats = tmp_path / "out" / "hf", tmp_path / "out" / "stats.json"
    with pytest.raises(NonFiniteError) as raised:
        prune_stage(model_dir, calib, out, stats, settings, progress=False)
    message = str(raised.value)
    assert "input of decoder layer 0" in message
    assert f"sample {PLANTED[0]} token {PLANTED[1]}" in message
    assert f"token id(s) [{token}]" in message and "embedding" in message
    assert "calibration data" in message
    assert not out.exists() and not stats.exists()
    assert not any((tmp_path / "out").glob(".hf.layers/layer-*.pt"))


@pytest.mark.parametrize("rotation", ["denoise", "none"])
@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_an_fp16_overflow_inside_a_layer_is_named_at_the_linears_statistics(
    pruner: str, rotation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Finite weights and inputs, but the MLP's intermediate activations exceed fp16's 65504.
    # Without rotation the pruning passes find it (Wanda's: in the Gram's diagonal alone).
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(300.0)
    if rotation == "none":
        real = pipeline.prune_weight
        pruned: list[str] = []
        monkeypatch.setattr(pipeline, "prune_weight", lambda *a, **k: pruned.append("x") or real(*a, **k))
    else:
        _forbid_work(monkeypatch)
    settings = _settings(pruner=pruner, pattern="50%", rotation=rotation, steps=3, dtype="float16")
    with pytest.raises(NonFiniteError) as raised:
        pipeline.run_pipeline(model, _ids(), settings, progress=False)
    message = str(raised.value)
    # down_proj's Gram is not needed by the rotation loss (its factor cancels): its inputs are
    # checked for inf/NaN in the same pass instead
    assert "layer 0 mlp.down_proj" in message and "overflowed" in message
    assert "bfloat16" in message
    if rotation == "none":  # q, k, v, o, gate, up pruned; down refused before its pruning
        assert len(pruned) == 6


def test_a_non_finite_weight_is_named_before_its_layer_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("qwen2", num_layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("nan")
    calls: list[str] = []
    real = pipeline.prune_weight

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("prune")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prune_weight", counting)
    settings = _settings(pruner="wanda", pattern="50%", rotation="none")
    with pytest.raises(NonFiniteError, match=r"layer 1 mlp\.up_proj\.weight"):
        pipeline.run_pipeline(model, _ids(), settings, progress=False)
    assert len(calls) == 7  # layer 0 only


# --- settings checked before activations are captured ---------------------------------------

# Out of range on their own: refused when the settings object is built (denoiserotator.settings,
# the same fields the config schema is generated from), naming section.key and the bound.
BAD_VALUES = [
    ({"percdamp": 0.0}, r"pruning\.percdamp: Input should be greater than 0"),
    ({"percdamp": -0.01, "pruner": "sparsegpt"}, r"pruning\.percdamp: Input should be greater than 0"),
    ({"steps": -1}, r"rotation\.steps: Input should be greater than or equal to 0, got -1"),
    ({"lr": 0.0}, r"rotation\.lr: Input should be greater than 0, got 0\.0"),
    ({"clip": 0.0}, r"rotation\.clip: Input should be greater than 0"),
    ({"prune_batch_size": 0}, r"compute\.prune_batch_size: Input should be greater than or equal to 1"),
    ({"sparsegpt_blocksize": 0, "pruner": "sparsegpt"},
     r"pruning\.sparsegpt_blocksize: Input should be greater than or equal to 1"),
    ({"loss_variant": "bf16"}, r"rotation\.loss_variant: Input should be 'paper' or 'reference', got 'bf16'"),
    ({"loss_score": "obs"}, r"rotation\.loss_score: Input should be 'magnitude', 'wanda' or 'sparsegpt'"),
    ({"dtype": "float8"}, r"compute\.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ({"pattern": "150%"}, r"allowed|percent|sparsity"),
]


@pytest.mark.parametrize("changes,message", BAD_VALUES, ids=[str(c[0]) for c in BAD_VALUES])
def test_bad_values_are_refused_when_the_settings_are_built(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(**{"pruner": "wanda", "rotation": "denoise", "steps": 2, **changes})


def test_a_nan_clip_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"rotation\.clip"):
        RotationSettings.from_mapping({"clip": float("nan")})


# Fine on their own, wrong for this model or machine: refused before activations are captured.
BAD_FOR_THE_MODEL = [
    (
        {"pattern": "2:5"},
        "pattern",
        r"input width 64 of layer 0 self_attn\.q_proj.*allowed M for this model: 2, 4, 8, 16, 32",
    ),
    ({"pattern": "1:3"}, "pattern", r"allowed M"),
    ({"device": "cuda"}, "device", "CUDA is not available"),
    ({"device": "tpu"}, "device", "not a device|unsupported"),
]


@pytest.mark.parametrize(
    "changes,setting,allowed", BAD_FOR_THE_MODEL, ids=[str(c[0]) for c in BAD_FOR_THE_MODEL]
)
def test_bad_settings_are_refused_before_activations_are_captured(
    changes: dict[str, Any], setting: str, allowed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("activations were captured before the settings were checked")

    monkeypatch.setattr(pipeline, "capture_layer_inputs", forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = _settings(**{"pruner": "wanda", "rotation": "denoise", "steps": 2, **changes})
    with pytest.raises(SettingError, match=rf"setting {setting}\b") as raised:
        pipeline.run_pipeline(tiny_model("llama", num_layers=2), _ids(), settings, progress=False)
    assert raised.match(allowed)
    assert isinstance(raised.value, SettingsError)  # one family of setting errors


def test_head_counts_that_do_not_divide_are_refused_naming_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "capture_layer_inputs", lambda *a, **k: pytest.fail("captured"))
    model = tiny_model("llama", num_layers=2)
    model.config.num_key_value_heads = 3  # 4 query heads
    settings = _settings(pruner="wanda", rotation="denoise", steps=2)
    with pytest.raises(
        SettingError, match="num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"
    ):
        pipeline.run_pipeline(model, _ids(), settings, progress=False)


def test_settings_are_checked_before_the_model_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prune_stage checks first: a missing model folder is never even opened.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = _settings(pruner="sparsegpt", device="cuda")
    with pytest.raises(SettingError, match="setting device"):
        prune_stage(
            tmp_path / "absent", tmp_path / "absent.pt", tmp_path / "o", tmp_path / "s.json", settings
        )
