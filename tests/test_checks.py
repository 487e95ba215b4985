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
import yaml

import denoiserotator.pipeline as pipeline
from denoiserotator.checks import BOUNDS, NonFiniteError, SettingError
from denoiserotator.data import save_calibration
from denoiserotator.prune import prune_stage
from denoiserotator.pruners import PRUNERS
from denoiserotator.rotation.loss import SCORES
from denoiserotator.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PLANTED = (1, 5)  # (sample, token) of the calibration token whose embedding row holds an inf


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
    settings = pipeline.PruneSettings(pruner=pruner, pattern="2:4", rotation=rotation, steps=3)
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


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_an_fp16_overflow_inside_a_layer_is_named_at_the_linears_statistics(
    pruner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Finite weights and inputs, but the MLP's intermediate activations exceed fp16's 65504.
    model = tiny_model("llama", num_layers=2)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(300.0)
    _forbid_work(monkeypatch)
    settings = pipeline.PruneSettings(
        pruner=pruner, pattern="50%", rotation="denoise", steps=3, dtype="float16"
    )
    with pytest.raises(NonFiniteError) as raised:
        pipeline.run_pipeline(model, _ids(), settings, progress=False)
    message = str(raised.value)
    assert "Gram matrix" in message and "layer 0 mlp.down_proj" in message
    assert "bfloat16" in message


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
    settings = pipeline.PruneSettings(pruner="wanda", pattern="50%", rotation="none")
    with pytest.raises(NonFiniteError, match=r"layer 1 mlp\.up_proj\.weight"):
        pipeline.run_pipeline(model, _ids(), settings, progress=False)
    assert len(calls) == 7  # layer 0 only


# --- settings checked before activations are captured ---------------------------------------

BAD_SETTINGS = [
    ({"percdamp": 0.0}, "percdamp", r"> 0"),
    ({"percdamp": -0.01, "pruner": "sparsegpt"}, "percdamp", r"> 0"),
    ({"steps": -1}, "steps", r">= 0"),
    ({"lr": 0.0}, "lr", r"> 0"),
    ({"clip": 0.0}, "clip", r"> 0"),
    ({"clip": float("nan")}, "clip", r"> 0"),
    ({"batch_size": 0}, "batch_size", r">= 1"),
    ({"sparsegpt_blocksize": 0, "pruner": "sparsegpt"}, "sparsegpt_blocksize", r">= 1"),
    ({"loss_variant": "bf16"}, "loss_variant", "paper, reference"),
    ({"loss_score": "obs"}, "loss_score", "magnitude, wanda, sparsegpt"),
    ({"rotation": "none", "loss_score": "wanda"}, "loss_score", "no effect"),
    ({"dtype": "float8"}, "dtype", "float32, bfloat16, float16"),
    (
        {"pattern": "2:5"},
        "pattern",
        r"input width 64 of layer 0 self_attn\.q_proj.*allowed M for this model: 2, 4, 8, 16, 32",
    ),  # noqa: E501
    ({"pattern": "1:3"}, "pattern", r"allowed M"),
    ({"pattern": "150%"}, "pattern", "allowed"),
    ({"device": "cuda"}, "device", "CUDA is not available"),
    ({"device": "tpu"}, "device", "not a device|unsupported"),
]


@pytest.mark.parametrize("changes,setting,allowed", BAD_SETTINGS, ids=[str(c[0]) for c in BAD_SETTINGS])
def test_bad_settings_are_refused_before_activations_are_captured(
    changes: dict[str, Any], setting: str, allowed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("activations were captured before the settings were checked")

    monkeypatch.setattr(pipeline, "capture_layer_inputs", forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = pipeline.PruneSettings(**{"pruner": "wanda", "rotation": "denoise", "steps": 2, **changes})
    with pytest.raises(SettingError, match=rf"setting {setting}\b") as raised:
        pipeline.run_pipeline(tiny_model("llama", num_layers=2), _ids(), settings, progress=False)
    assert raised.match(allowed)


def test_head_counts_that_do_not_divide_are_refused_naming_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "capture_layer_inputs", lambda *a, **k: pytest.fail("captured"))
    model = tiny_model("llama", num_layers=2)
    model.config.num_key_value_heads = 3  # 4 query heads
    settings = pipeline.PruneSettings(pruner="wanda", rotation="denoise", steps=2)
    with pytest.raises(
        SettingError, match="num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"
    ):
        pipeline.run_pipeline(model, _ids(), settings, progress=False)


def test_settings_are_checked_before_the_model_is_loaded(tmp_path: Path) -> None:
    # prune_stage validates first: a missing model folder is never even opened.
    settings = pipeline.PruneSettings(pruner="sparsegpt", percdamp=0.0)
    with pytest.raises(SettingError, match="setting percdamp"):
        prune_stage(
            tmp_path / "absent", tmp_path / "absent.pt", tmp_path / "o", tmp_path / "s.json", settings
        )


# --- the Snakemake schema and the package agree ----------------------------------------------

# schema path -> PruneSettings field, for every setting the workflow passes to the prune stage
SHARED = {
    ("rotation", "steps"): "steps",
    ("rotation", "lr"): "lr",
    ("rotation", "clip"): "clip",
    ("rotation", "loss_variant"): "loss_variant",
    ("rotation", "loss_score"): "loss_score",
    ("pruning", "sparsegpt_blocksize"): "sparsegpt_blocksize",
    ("pruning", "percdamp"): "percdamp",
    ("compute", "dtype"): "dtype",
    ("compute", "prune_batch_size"): "batch_size",
}


def _accepted(**changes: Any) -> bool:
    settings = pipeline.PruneSettings(**{"pruner": "sparsegpt", "rotation": "denoise", **changes})
    try:
        settings.validate()
    except ValueError:
        return False
    return True


def test_schema_and_package_agree_on_the_shared_settings() -> None:
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    numeric = 0
    for (section, key), field in SHARED.items():
        spec = schema["properties"][section]["properties"][key]
        assert _accepted(**{field: spec["default"]}), (key, spec["default"])
        if "enum" in spec:
            allowed = [value for value in spec["enum"] if value is not None]
            for value in allowed:
                assert _accepted(**{field: value}), (key, value)
            assert not _accepted(**{field: "not-a-" + key}), key
            continue
        bounds = {kind: spec[kind] for kind in ("minimum", "exclusiveMinimum") if kind in spec}
        assert len(bounds) == 1, f"{section}.{key}: expected one lower bound in the schema"
        ((kind, bound),) = bounds.items()
        assert BOUNDS[field] == (kind, bound), (
            f"{section}.{key}: schema {kind} {bound}, package {BOUNDS[field]}"
        )
        step = 1 if spec["type"] == "integer" else 1e-6
        below, at = bound - step, bound
        assert not _accepted(**{field: below}), (key, below)
        assert _accepted(**{field: at}) == (kind == "minimum"), (key, at)
        assert _accepted(**{field: bound + step}), (key, bound + step)
        numeric += 1
    assert numeric == len(BOUNDS)
    # the workflow's choices are the package's
    assert set(schema["properties"]["pruners"]["items"]["enum"]) == set(PRUNERS)
    assert set(schema["properties"]["rotations"]["items"]["enum"]) == {"none", "denoise"}
    assert set(schema["properties"]["rotation"]["properties"]["loss_score"]["enum"]) - {None} == set(SCORES)
    assert set(schema["properties"]["compute"]["properties"]["dtype"]["enum"]) == set(pipeline.DTYPES)
