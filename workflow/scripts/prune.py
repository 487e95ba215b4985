"""Rotate (DenoiseRotator) and/or prune one model (rule prune)."""

import logging
import sys
from pathlib import Path

sys.stdout = sys.stderr = open(snakemake.log[0], "w", buffering=1)  # noqa: F821
logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")

import torch  # noqa: E402

from denoiserotator.pipeline import PruneSettings  # noqa: E402
from denoiserotator.prune import prune_stage  # noqa: E402

torch.set_num_threads(snakemake.threads)  # noqa: F821
s = snakemake.params.settings  # noqa: F821
# plain-pruning rows carry no rotation settings (see get_prune_params); the defaults are unused
rotation = {k: s[k] for k in ("steps", "lr", "clip", "loss_variant", "seed", "loss_score") if k in s}
settings = PruneSettings(
    pruner=s["pruner"], pattern=s["pattern"], rotation=s["rotation"], device=s["device"], dtype=s["dtype"],
    batch_size=s["batch_size"], sparsegpt_blocksize=s["sparsegpt_blocksize"], percdamp=s["percdamp"],
    **rotation,
)
torch.manual_seed(settings.seed)
prune_stage(
    Path(snakemake.input.model), Path(snakemake.input.calib),  # noqa: F821
    Path(snakemake.output.model), Path(snakemake.output.stats),  # noqa: F821
    settings, progress=False,
)
