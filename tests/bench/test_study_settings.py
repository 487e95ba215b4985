"""The studies read their settings as the workflow does (demo_rotation_budget, rotation_speed)."""

from __future__ import annotations

import yaml

from bench.demo_rotation_budget import demo_settings
from tests.conftest import ROOT


def test_the_demo_settings_are_read_with_their_defaults() -> None:
    """config/demo.yaml leaves calibration.seed/mode and the pruning section to the defaults; the
    study reads them filled in (it used to index the raw YAML and failed with KeyError)."""
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    assert "seed" not in config["calibration"] and "pruning" not in config
    rotation, calibration, pruning, compute = demo_settings(config)
    assert rotation.steps == config["rotation"]["steps"]
    assert rotation.matmul_precision == config["rotation"]["matmul_precision"]
    assert calibration["nsamples"] == config["calibration"]["nsamples"]
    assert calibration["seed"] == 0 and calibration["mode"] == "auto"
    assert pruning.percdamp == 0.01
    assert compute.threads == config["compute"]["threads"] and compute.checkpoint_every_layers == 0


def test_rotation_speed_variants_parse_as_yaml() -> None:
    from bench.rotation_speed import parse_variant

    assert parse_variant("default") == ("default", {})
    assert parse_variant("b:matmul_precision=medium,tangent_betas=[0.95,0.99],tangent_lr=0.01") == (
        "b",
        {"matmul_precision": "medium", "tangent_betas": [0.95, 0.99], "tangent_lr": 0.01},
    )
