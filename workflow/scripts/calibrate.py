"""Calibration token ids with their sha256 (rule calibrate)."""

from pathlib import Path

from denoiserotator.logs import log_to

log_to(snakemake.log[0], offline_hub=True)  # noqa: F821  (compute job)

from denoiserotator.calibrate import calibrate_stage  # noqa: E402
from denoiserotator.settings import CalibrationSettings  # noqa: E402

# writes the .pt atomically and the .json sidecar (meta incl. sha256) next to it
calibrate_stage(
    Path(snakemake.input.model), Path(snakemake.output.ids),  # noqa: F821
    CalibrationSettings.from_mapping(snakemake.params.settings),  # noqa: F821
)
