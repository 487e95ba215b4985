"""One way for workflow scripts to log: everything they print goes to the rule's `log:` file.

Compute jobs (`log_to(..., offline=True)`) also switch the Hugging Face libraries offline: compute
nodes often have no internet, and everything they read was fetched by a local rule into
`resources/` (docs/cluster.md).
"""

from __future__ import annotations

import logging
import os
import sys

# read by huggingface_hub, datasets and transformers when they are imported
HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_HUB_MODULES = ("huggingface_hub", "datasets", "transformers", "lm_eval")


def offline() -> dict[str, str]:
    """Set HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and TRANSFORMERS_OFFLINE to 1 and log it.

    Must run before any hub library is imported (they read the variables once, at import):
    raises RuntimeError naming the modules already imported otherwise. Returns the variables set.
    """
    imported = [name for name in _HUB_MODULES if name in sys.modules]
    if imported:
        raise RuntimeError(f"offline() after {imported} were imported: they would stay online")
    values = {name: "1" for name in HUB_OFFLINE_VARIABLES}
    os.environ.update(values)
    logging.info("hub offline: %s", " ".join(f"{k}={v}" for k, v in values.items()))
    return values


def log_to(path: str, threads: int | None = None, offline_hub: bool = False) -> None:
    """Send stdout, stderr and `logging` (INFO) to `path` (line-buffered); set torch's threads;
    with `offline_hub`, switch the hub libraries offline first (`offline`)."""
    stream = open(path, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    sys.stdout = sys.stderr = stream
    layout = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(stream=stream, level=logging.INFO, format=layout, force=True)
    if offline_hub:
        offline()
    if threads:
        import torch

        torch.set_num_threads(threads)


def rotation_summary(record: dict) -> str:
    """A layer's rotation training in words (`RotationResult.summary()` keys), e.g.
    `loss 812.3 → 640.1 (-21.2%), 137 steps (best at 130), stopped: plateau, damping 0.1`:
    why training stopped (plateau, step budget, ...), and the SparseGPT statistic's damping
    when an indefinite Gram forced it above the pruner's 1 %."""
    start, best = record["entropy_before"], record["entropy_after"]
    drop = 100.0 * (best - start) / start if start else 0.0
    line = (f"loss {start:.4g} → {best:.4g} ({drop:+.1f}%), {record.get('rotation_steps')} steps "
            f"(best at {record.get('rotation_best_step')})")  # fmt: skip
    stop = record.get("rotation_stop")
    if stop is not None:  # "steps": the name before "step budget"
        line += f", stopped: {'step budget' if stop == 'steps' else stop}"
    if (record.get("rotation_damping") or 0.0) > 0.01:
        line += f", damping {record['rotation_damping']:g}"
    return line


def layer_summary(record: dict, num_layers: int) -> str:
    """The readable part of a finished layer's line (`pipeline.describe_layer`, the report), e.g.
    `layer 12/80: loss 812.3 → 640.1 (-21.2%), 400 steps (best at 388), sparsity 0.500, 41.2 s`.
    `record`: one entry of a prune job's per-layer stats."""
    parts = [f"layer {record['layer'] + 1}/{num_layers}:"]
    if "entropy_before" in record:
        parts.append(rotation_summary(record) + ",")
    if "sparsity" in record:
        values = list(record["sparsity"].values())
        parts.append(f"sparsity {sum(values) / len(values):.3f},")
    if "refine_error" in record:  # mean relative reconstruction error over the linears
        before, after = (sum(v[i] for v in record["refine_error"].values()) / len(record["refine_error"])
                         for i in (0, 1))  # fmt: skip
        parts.append(f"refined error {before:.4f} → {after:.4f} ({record['refine_seconds']:.1f} s),")
    if "seconds" in record:
        parts.append(f"{record['seconds']:.1f} s")
    return " ".join(parts).rstrip(",")
