"""Settings classes: the committed schema and key reference are generated from them, CLIs come
from them, errors name the key, identities leave out what does not change a result."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from snakemake.utils import validate

from denoiserotator.settings import (
    ComputeSettings,
    LoraSettings,
    PipelineConfig,
    RotationSettings,
    SettingsError,
    ZeroshotSettings,
    config_schema,
    key_reference,
    schema_text,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "workflow/schemas/config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_FILE.read_text())
MINIMAL = {"models": [{"slug": "m", "source": "tiny:llama"}]}


def test_the_committed_schema_is_generated_from_the_classes() -> None:
    """The whole schema Snakemake validates against is the classes' (regenerate with
    `python -m denoiserotator.settings schema`)."""
    assert SCHEMA_FILE.read_text() == schema_text()


def test_the_key_reference_of_config_readme_is_generated_from_the_classes() -> None:
    """config/README.md's key reference is the classes' (`python -m denoiserotator.settings reference`)."""
    readme = (ROOT / "config/README.md").read_text()
    assert key_reference() in readme
    for name in PipelineConfig.model_fields:
        assert f"| `{name}" in key_reference(), name


def test_snakemakes_defaults_are_the_classes_defaults() -> None:
    """Snakemake fills a config from the schema's defaults; the result is the config the classes
    build from the same minimal input, section by section and key by key."""
    filled = copy.deepcopy(MINIMAL)
    validate(filled, str(SCHEMA_FILE))
    assert PipelineConfig.from_mapping(filled) == PipelineConfig.from_mapping(MINIMAL)
    assert filled["rotation"] == RotationSettings().to_dict()
    assert filled["finetune"]["lora"] == LoraSettings().to_dict()
    assert filled["models"][0]["num_layers"] == 2


@pytest.mark.parametrize("config", ["config.yaml", "demo.yaml", "test.yaml"])
def test_shipped_configs_validate_and_build(config: str) -> None:
    data = yaml.safe_load((ROOT / "config" / config).read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    PipelineConfig.from_mapping(data)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"lr": 0}, r"rotation\.lr: Input should be greater than 0, got 0"),
        ({"steps": -1}, r"rotation\.steps: Input should be greater than or equal to 0, got -1"),
        ({"betas": [0.9]}, r"rotation\.betas\[1\]: required"),
        ({"betas": [0.9, 1.0]}, r"rotation\.betas\[1\]: Input should be less than 1, got 1\.0"),
        ({"loss_variant": "fast"}, r"rotation\.loss_variant: Input should be 'paper' or 'reference'"),
        ({"stpes": 5}, r"unknown key\(s\) stpes in rotation; allowed: .*steps"),
        ({"steps": 2.5}, r"rotation\.steps: Input should be a valid integer, got 2\.5"),
        ({"steps": "5"}, r"rotation\.steps: Input should be a valid integer, got '5'"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(bad: dict, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        RotationSettings.from_mapping(bad)


def test_schema_rejects_what_the_classes_reject() -> None:
    """The same bad values fail both JSON-schema validation and the class."""
    validator = jsonschema.Draft202012Validator(RotationSettings.json_schema())
    for bad in ({"lr": 0}, {"betas": [0.9, 1.0]}, {"steps": -1}, {"loss_score": "obs"}):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(SettingsError):
            RotationSettings.from_mapping(bad)


def test_cli_is_generated_from_the_fields() -> None:
    parser = argparse.ArgumentParser()
    RotationSettings.add_arguments(parser)
    args = parser.parse_args(
        ["--steps", "7", "--betas", "0.8", "0.99", "--no-learn-r2", "--loss-score", "wanda"]
    )
    settings = RotationSettings.from_namespace(args)
    assert settings == RotationSettings(steps=7, betas=(0.8, 0.99), learn_r2=False, loss_score="wanda")
    assert RotationSettings.from_namespace(parser.parse_args([])) == RotationSettings()
    help_text = parser.format_help()
    assert "Adam's (beta1, beta2) (default: [0.9, 0.999])" in help_text


def test_identity_leaves_out_how_a_result_is_computed() -> None:
    """Device, threads and batch sizes change no number: they are not part of output ids;
    fixtures count only for local zero-shot tasks; an optimizer's knobs only when it is selected."""
    assert "device" not in ComputeSettings().identity() and "dtype" in ComputeSettings().identity()
    assert ComputeSettings(device="cpu").short_id() == ComputeSettings(device="cuda", threads=2).short_id()
    assert LoraSettings(gradient_checkpointing=True).short_id() == LoraSettings().short_id()
    assert ZeroshotSettings(fixture_items=3).short_id() == ZeroshotSettings().short_id()
    local = ZeroshotSettings(source="local")
    assert ZeroshotSettings(source="local", fixture_items=3).short_id() != local.short_id()
    # only the selected optimizer's knobs: the paper optimizer's betas do not rename a cayley row
    assert RotationSettings(betas=(0.8, 0.999)).short_id() == RotationSettings().short_id()
    assert RotationSettings(tangent_betas=(0.7, 0.99)).short_id() != RotationSettings().short_id()
    paper = RotationSettings(optimizer="paper")
    assert RotationSettings(optimizer="paper", betas=(0.8, 0.999)).short_id() != paper.short_id()


def test_yaml_lists_become_hashable_tuples() -> None:
    settings = RotationSettings.from_mapping({"betas": [0.5, 0.9], "lr": 1})
    assert settings.betas == (0.5, 0.9) and isinstance(settings.lr, float)
    hash(settings)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"models": []}, r"models: at least one model"),
        ({"models": [{"slug": "m", "source": "tiny:gpt2"}]}, r"models\[0\]\.source: String should match"),
        ({"models": [{"slug": "m", "source": "tiny:llama", "sahpe": {}}]},
         r"unknown key\(s\) sahpe in models\[0\]; allowed: .*shape"),
        ({"models": [{"slug": "m", "source": "tiny:llama", "resources": {"prnue": {"mem_mb": 1}}}]},
         r"models\[0\]\.resources\.prnue: Input should be .fetch."),
        ({"finetune": {"rows": [{"pruner": "obs", "pattern": "2:4"}]}},
         r"finetune\.rows\[0\]\.pruner: Input should be 'magnitude', 'wanda' or 'sparsegpt'"),
        ({"patterns": ["50%", "50%"]}, r"patterns has duplicates"),
        ({"models": [{"slug": "m", "source": "tiny:llama"}] * 2}, r"slugs must be unique"),
        ({"eval": {"zeroshot": {"rows": ["wanda"]}}}, r"eval\.zeroshot\.rows: 'wanda' is not pruner/pattern"),
    ],
)
def test_the_whole_config_is_typed(bad: dict, match: str) -> None:
    """Model entries, the grid lists, finetune.rows and their nesting are validated by the classes,
    with the key's full path in the message."""
    with pytest.raises(SettingsError, match=match):
        PipelineConfig.from_mapping({**MINIMAL, **bad})


def test_the_schema_rejects_what_the_config_classes_reject() -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    for bad in ({"models": []}, {"pruners": ["obs"]}, {"patterns": ["50%", "50%"]},
                {"models": [{"slug": "M", "source": "tiny:llama"}]}):  # fmt: skip
        assert list(validator.iter_errors({**MINIMAL, **bad})), bad
        with pytest.raises(SettingsError):
            PipelineConfig.from_mapping({**MINIMAL, **bad})
