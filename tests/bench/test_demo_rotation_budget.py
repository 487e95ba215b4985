"""bench/demo_rotation_budget.py reads the demo's settings as the workflow does."""

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
