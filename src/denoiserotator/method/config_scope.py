"""Temporary changes to a model config, restored on exit (also on error).

The pipeline changes config fields for its own purposes only (e.g. `use_cache = False` while
calibration activations are captured); those must never reach an exported folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["temporary_config"]

_ABSENT = object()


@contextmanager
def temporary_config(config: Any, **values: Any) -> Iterator[Any]:
    """Set `values` on `config` while the block runs; restore every previous value (or absence) after."""
    saved = {name: getattr(config, name, _ABSENT) for name in values}
    try:
        for name, value in values.items():
            setattr(config, name, value)
        yield config
    finally:
        for name, value in saved.items():
            if value is _ABSENT:
                if hasattr(config, name):
                    delattr(config, name)
            else:
                setattr(config, name, value)
