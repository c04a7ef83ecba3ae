"""Where models and variants live on disk: the cache directory and the default model's alias.

`TRIMSERVE_CACHE` (default `~/.cache/trimserve`) holds converted models (`models/`), built
variants (`variants/`) and the output of supervised processes (`logs/`). No torch here.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("TRIMSERVE_CACHE", Path.home() / ".cache" / "trimserve")).expanduser()


def variants_dir() -> Path:
    """Where built-in variants live: `$TRIMSERVE_CACHE/variants`."""
    return cache_dir() / "variants"
