"""Planning refuses a family no adapter rotates exactly, naming the architecture and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from denoiserotator.plan.experiment import Experiment
from denoiserotator.settings import SettingsError
from tests.conftest import merged_config


def _with_model(**entry: object) -> dict:
    return merged_config("test.yaml", models=[{"slug": "m", "params_b": 1.0, **entry}])


def test_a_refused_architecture_key_is_refused_with_the_reason() -> None:
    with pytest.raises(SettingsError, match=r"Gemma2ForCausalLM is refused: Gemma 2 \(sandwich norms"):
        Experiment(_with_model(source="hf:google/gemma-2-9b", architecture="Gemma2ForCausalLM"))


def test_an_unknown_architecture_is_refused_naming_the_supported_ones() -> None:
    with pytest.raises(
        SettingsError, match=r"unsupported architecture \['FalconForCausalLM'\].*Qwen3ForCausalLM"
    ):
        Experiment(_with_model(source="hf:tiiuae/falcon-7b", architecture="FalconForCausalLM"))


def test_a_local_folders_config_json_decides(tmp_path: Path) -> None:
    from transformers import Gemma2Config, Qwen3Config

    Qwen3Config(architectures=["Qwen3ForCausalLM"]).save_pretrained(tmp_path / "qwen3")
    Experiment(_with_model(source=f"local:{tmp_path / 'qwen3'}"))
    Gemma2Config(architectures=["Gemma2ForCausalLM"]).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(
        SettingsError,
        match=rf"model 'm' \({tmp_path / 'gemma2'}/config.json\): architecture Gemma2ForCausalLM",
    ):
        Experiment(_with_model(source=f"local:{tmp_path / 'gemma2'}"))
    # a stated architecture does not override the folder's own config.json
    with pytest.raises(SettingsError, match="Gemma2ForCausalLM is refused"):
        Experiment(_with_model(source=f"local:{tmp_path / 'gemma2'}", architecture="Qwen3ForCausalLM"))


def test_a_hub_model_of_unknown_architecture_is_left_to_its_fetch() -> None:
    experiment = Experiment(_with_model(source="hf:nobody/not-in-the-cache"))
    assert list(experiment.models) == ["m"]


def test_fetching_a_refused_hub_model_stops_after_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from transformers import Gemma2Config

    from denoiserotator.files.assets import materialise_model
    from denoiserotator.method.adapters import UnsupportedArchitectureError

    downloads: list[list[str]] = []

    def fake_download(repo: str, local_dir: Path, allow_patterns: list[str]) -> None:
        downloads.append(allow_patterns)
        Gemma2Config(architectures=["Gemma2ForCausalLM"]).save_pretrained(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(UnsupportedArchitectureError, match="Gemma2ForCausalLM is refused"):
        materialise_model("hf:google/gemma-2-9b", tmp_path / "models" / "gemma")
    assert downloads == [["config.json"]]
    assert not list((tmp_path / "models").iterdir())  # nor a temporary folder


def test_the_commented_example_entries_of_the_paper_grid_plan_as_their_comments_say() -> None:
    import re

    import yaml

    from tests.conftest import ROOT

    text = (ROOT / "config/config.yaml").read_text()
    commented = [line for line in text.splitlines() if re.match(r"^  # ( |- )", line) and ":" in line]
    block = "\n".join(line[4:] for line in commented)
    entries = yaml.safe_load(block)
    assert [entry["slug"] for entry in entries] == ["qwen3-8b", "phi-4", "gemma3-1b", "gemma3-4b"]
    for entry in entries[:3]:
        assert list(Experiment(merged_config("test.yaml", models=[entry])).models) == [entry["slug"]]
    with pytest.raises(SettingsError, match="Gemma3ForConditionalGeneration is refused: a multimodal"):
        Experiment(merged_config("test.yaml", models=[entries[3]]))


def test_a_config_json_naming_no_architecture_leaves_the_decision_to_the_next_source(tmp_path: Path) -> None:
    (tmp_path / "placeholder").mkdir()
    (tmp_path / "placeholder" / "config.json").write_text("{}")
    Experiment(_with_model(source=f"local:{tmp_path / 'placeholder'}"))
    with pytest.raises(SettingsError, match="Gemma2ForCausalLM is refused"):
        Experiment(_with_model(source=f"local:{tmp_path / 'placeholder'}", architecture="Gemma2ForCausalLM"))
