"""Windowed perplexity against a hand computation (one window at a time, explicit log-softmax)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from denoiserotator.evaluate import perplexity as perplexity_module
from denoiserotator.evaluate.perplexity import perplexity
from denoiserotator.files.text import perplexity_ids
from denoiserotator.testing import FAMILIES, save_tiny_model, tiny_model, tiny_tokenizer


def hand_ppl(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * seqlen : (w + 1) * seqlen]
            logits = model(window[None]).logits[0].double()
            for t in range(seqlen - 1):
                logp = logits[t] - torch.logsumexp(logits[t], dim=0)
                total -= logp[window[t + 1]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_perplexity_matches_hand_computation_and_drops_remainder(family: str) -> None:
    model = tiny_model(family, seed=1)
    seqlen = 12
    ids = torch.randint(3, 384, (3 * seqlen + 7,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen)
    assert result["windows"] == 3 and result["tokens"] == 3 * (seqlen - 1) and result["seqlen"] == seqlen
    assert result["ppl"] == pytest.approx(hand_ppl(model, ids, seqlen, 3), rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(result["ppl"]), rel=1e-9)
    # The 7 leftover tokens never enter: changing them changes nothing.
    changed = ids.clone()
    changed[-7:] = 5
    assert perplexity(model, changed, seqlen)["ppl"] == result["ppl"]
    # Batching does not change the result; max_windows keeps the first windows.
    assert perplexity(model, ids, seqlen, batch_size=2)["ppl"] == pytest.approx(result["ppl"], rel=1e-6)
    first_two = perplexity(model, ids, seqlen, max_windows=2)
    assert first_two["windows"] == 2
    assert first_two["ppl"] == pytest.approx(hand_ppl(model, ids, seqlen, 2), rel=1e-5)


def test_perplexity_stderr_from_the_spread_of_window_nlls() -> None:
    """Claim: window_nll[w] is window w's own mean NLL, nll_stderr = sample sd / sqrt(W), and the
    interval is exp(nll ± se); one window has no standard error."""
    model, seqlen = tiny_model("llama", seed=1), 10
    ids = torch.randint(3, 384, (4 * seqlen,), generator=torch.Generator().manual_seed(3))
    result = perplexity(model, ids, seqlen, batch_size=3)  # a batch of 3 and one of 1
    hand = [math.log(hand_ppl(model, ids[w * seqlen :], seqlen, 1)) for w in range(4)]
    assert result["window_nll"] == pytest.approx(hand, rel=1e-5)
    mean = sum(hand) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in hand) / 3 / 4)
    assert se > 0 and result["nll_stderr"] == pytest.approx(se, rel=1e-4)
    assert result["ppl_low"] == pytest.approx(math.exp(mean - se), rel=1e-5)
    assert result["ppl_high"] == pytest.approx(math.exp(mean + se), rel=1e-5)
    assert result["ppl_low"] < result["ppl"] < result["ppl_high"]
    single = perplexity(model, ids, seqlen, max_windows=1)
    assert single["nll_stderr"] is None and single["ppl_low"] is None and single["ppl_high"] is None


def test_perplexity_rejects_too_short_stream() -> None:
    with pytest.raises(ValueError, match="window"):
        perplexity(tiny_model("llama"), torch.arange(5), 8)


def test_perplexity_cli(tmp_path: Path) -> None:
    model_dir = save_tiny_model("qwen2", tmp_path / "model")
    text = tmp_path / "eval.jsonl"
    rows = [json.dumps({"text": f"Call me Ishmael, said sailor {i}."}) for i in range(20)]
    text.write_text("\n".join(rows) + "\n")
    out = tmp_path / "ppl.json"
    perplexity_module.main(
        [
            "--model",
            str(model_dir),
            "--dataset",
            f"json:{text}",
            "--seqlen",
            "16",
            "--max-windows",
            "3",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    ids = perplexity_ids(tiny_tokenizer(), f"json:{text}", 16)
    model = tiny_model("qwen2")
    assert result["ppl"] == pytest.approx(hand_ppl(model, ids, 16, 3), rel=1e-5)
    assert result["windows"] == 3 and result["seqlen"] == 16 and result["bos"] is False
    assert result["dataset"] == f"json:{text}" and result["model"] == str(model_dir)


def _orthogonal(size: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(seed)))
    return q


def _saved(family: str, folder: Path, rotated: bool, tie: bool = False, **overrides: object) -> Path:
    """A tiny folder; `rotated`: boundary rotations merged into layers 0 and 2 (Rotated* class)."""
    from denoiserotator.files.export import save_model

    model = tiny_model(family, seed=3, num_layers=3, tie=tie, **overrides)
    boundary = [_orthogonal(64, 1), None, _orthogonal(64, 2)] if rotated else None
    save_model(model, tiny_tokenizer(), folder, boundary=boundary)
    return folder


@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_perplexity_equals_whole_model(family: str, rotated: bool, tmp_path: Path) -> None:
    """Claim: one decoder layer at a time gives the whole-model forward's perplexity (fp32), for
    every family, plain and with merged boundary rotations (loaded as Rotated*: the hooks act in
    both paths), with a last batch smaller than the others (its own recorded kwargs)."""
    from denoiserotator.files.export import load_model
    from denoiserotator.files.modeling_denoiserotator import is_rotated

    model, _ = load_model(_saved(family, tmp_path / "m", rotated))
    assert is_rotated(model) == rotated
    ids = torch.randint(3, 384, (5 * 40 + 3,), generator=torch.Generator().manual_seed(4))
    whole = perplexity(model, ids, 40, batch_size=2)
    layerwise = perplexity_module.perplexity_layerwise(model, ids, 40, batch_size=2, device="cpu")
    assert layerwise["windows"] == whole["windows"] == 5 and layerwise["tokens"] == whole["tokens"]
    assert layerwise["nll"] == pytest.approx(whole["nll"], rel=1e-6, abs=0)
    # The boundary rotations matter: without them the perplexity is another one.
    if rotated:
        from denoiserotator.files.modeling_denoiserotator import attach_boundary_rotations

        attach_boundary_rotations(model, [None] * 3)
        assert perplexity_module.perplexity_layerwise(model, ids, 40)["nll"] != pytest.approx(
            whole["nll"], rel=1e-4
        )


def test_layerwise_perplexity_soft_caps_the_logits_as_the_model_does(tmp_path: Path) -> None:
    """Gemma-style `final_logit_softcapping` (tanh(z / c)·c after lm_head) in both paths."""
    from denoiserotator.files.export import load_model

    model, _ = load_model(_saved("gemma3_text", tmp_path / "m", False, final_logit_softcapping=0.5))
    ids = torch.randint(3, 384, (4 * 40,), generator=torch.Generator().manual_seed(4))
    whole = perplexity(model, ids, 40, batch_size=2)
    assert perplexity_module.perplexity_layerwise(model, ids, 40, batch_size=2)["nll"] == pytest.approx(
        whole["nll"], rel=1e-6
    )
    model.config.final_logit_softcapping = None
    assert perplexity(model, ids, 40, batch_size=2)["nll"] != pytest.approx(whole["nll"], rel=1e-3)


def test_layerwise_perplexity_in_bfloat16_keeps_rotary_frequencies(tmp_path: Path) -> None:
    """Claim: in a bfloat16 model the layer-wise path computes the position embeddings as the model
    does (rotary inv_freq stays float32 while activations are captured): same perplexity as the
    whole model over 256-token windows (the same bf16 operations in the same order, so equal to
    fp64 rounding; a bf16-rounded inv_freq moved the NLL by 4e-5 relative here)."""
    from denoiserotator.files.export import load_model

    model, _ = load_model(_saved("llama", tmp_path / "m", rotated=True), dtype=torch.bfloat16)
    ids = torch.randint(3, 384, (2 * 256,), generator=torch.Generator().manual_seed(5))
    whole = perplexity(model, ids, 256)
    layerwise = perplexity_module.perplexity_layerwise(model, ids, 256)
    assert layerwise["nll"] == pytest.approx(whole["nll"], rel=1e-9)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize(("mode", "device", "expected"), [
    ("auto", "cuda", "layerwise"), ("auto", "cuda:1", "layerwise"), ("auto", "cpu", "whole"),
    ("whole", "cuda", "whole"), ("layerwise", "cpu", "layerwise"),
])  # fmt: skip
def test_eval_mode_resolution(mode: str, device: str, expected: str) -> None:
    """Claim: auto streams layers on CUDA and runs the whole model on the CPU; explicit modes win."""
    from denoiserotator.settings import ComputeSettings

    assert ComputeSettings(eval_mode=mode).resolved_eval_mode(device) == expected


def test_perplexity_stage_runs_the_resolved_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim: the stage scores with the layer-wise function when the mode says so, records the mode,
    and its result equals the whole-model run of the same folder."""
    from denoiserotator.settings import ComputeSettings, PerplexitySettings

    folder = _saved("qwen2", tmp_path / "m", rotated=True)
    text = tmp_path / "eval.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Call me Ishmael, said sailor {i}."}) for i in range(30)))
    settings = PerplexitySettings(dataset=f"json:{text}", seqlen=16, max_windows=5)
    calls = []
    real = perplexity_module.perplexity_layerwise
    monkeypatch.setattr(perplexity_module, "perplexity_layerwise",
                        lambda *a, **k: calls.append(k) or real(*a, **k))  # fmt: skip
    layerwise = perplexity_module.perplexity_stage(
        folder, tmp_path / "a.json", settings, ComputeSettings(device="cpu", eval_mode="layerwise")
    )
    whole = perplexity_module.perplexity_stage(
        folder, tmp_path / "b.json", settings, ComputeSettings(device="cpu", eval_mode="auto")
    )
    assert len(calls) == 1 and layerwise["eval_mode"] == "layerwise" and whole["eval_mode"] == "whole"
    assert layerwise["nll"] == pytest.approx(whole["nll"], rel=1e-6)
