"""One way for workflow scripts to log: everything they print goes to the rule's `log:` file."""

from __future__ import annotations

import logging
import sys


def log_to(path: str, threads: int | None = None) -> None:
    """Send stdout, stderr and `logging` (INFO) to `path` (line-buffered); set torch's threads."""
    stream = open(path, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    sys.stdout = sys.stderr = stream
    layout = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(stream=stream, level=logging.INFO, format=layout, force=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
