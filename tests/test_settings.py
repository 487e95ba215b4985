"""Settings classes: the schema agrees with them (defaults included), CLIs come from them,
errors name the key, identities leave out what does not change a result."""

from __future__ import annotations

import argparse
from pathlib import Path

import jsonschema
import pytest
import yaml

from denoiserotator.settings import (
    SCHEMA_SECTIONS,
    ComputeSettings,
    LoraSettings,
    RotationSettings,
    SettingsError,
    ZeroshotSettings,
    _schema_node,
    section_schema,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())


@pytest.mark.parametrize("section", list(SCHEMA_SECTIONS), ids=lambda s: ".".join(s))
def test_schema_sections_are_the_settings_classes(section: tuple[str, ...]) -> None:
    """Every stage section of the workflow schema equals the one generated from its class:
    same keys, types, bounds, choices and defaults (regenerate with
    `python -m denoiserotator.settings schema workflow/schemas/config.schema.yaml`)."""
    assert _schema_node(SCHEMA, section) == section_schema(section)


@pytest.mark.parametrize("section", list(SCHEMA_SECTIONS), ids=lambda s: ".".join(s))
def test_schema_defaults_build_the_class_defaults(section: tuple[str, ...]) -> None:
    """Filling a section from the schema's defaults gives the class's own defaults."""
    cls = SCHEMA_SECTIONS[section]
    node = _schema_node(SCHEMA, section)
    defaults = {key: prop["default"] for key, prop in node["properties"].items()}
    assert cls.from_mapping(defaults) == cls()


@pytest.mark.parametrize("config", ["config.yaml", "demo.yaml", "test.yaml"])
def test_shipped_configs_validate_and_build_every_section(config: str) -> None:
    data = yaml.safe_load((ROOT / "config" / config).read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    for section, cls in SCHEMA_SECTIONS.items():
        parent = data
        for key in section[:-1] if section[-1] == "[]" else section:
            parent = parent.get(key, {})
        for mapping in parent if section[-1] == "[]" else [parent]:
            cls.from_mapping(mapping)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"lr": 0}, r"rotation\.lr must be > 0"),
        ({"steps": -1}, r"rotation\.steps must be >= 0"),
        ({"betas": [0.9]}, r"rotation\.betas must have 2 entries"),
        ({"betas": [0.9, 1.0]}, r"rotation\.betas must be < 1"),
        ({"loss_variant": "fast"}, r"rotation\.loss_variant: 'fast' is not one of 'paper', 'reference'"),
        ({"stpes": 5}, r"unknown key\(s\) stpes in rotation; allowed: .*steps"),
        ({"steps": 2.5}, r"rotation\.steps must be of type integer"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(bad: dict, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        RotationSettings.from_mapping(bad)


def test_schema_rejects_what_the_classes_reject() -> None:
    """The same bad values fail both JSON-schema validation and the class."""
    validator = jsonschema.Draft202012Validator(section_schema(("rotation",)))
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


def test_schema_registries_are_the_packages() -> None:
    """Pruner names, dtypes and model families appear in the schema's hand-written part; they are
    written from the package's registries (PRUNERS, DTYPES, testing.FAMILIES), so each exists once."""
    from denoiserotator.settings import _registry_parent, registry_values

    for key_path, value in registry_values().items():
        assert _registry_parent(SCHEMA, key_path)[key_path[-1]] == value, key_path
