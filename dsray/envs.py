"""Every environment variable dsray reads, in one place.

Read through the accessors below, never with ``os.environ`` elsewhere, so that the
full list of knobs is visible here.
"""

from __future__ import annotations

import os
from pathlib import Path


def dsray_home() -> Path:
    """Where dsray keeps generated models and caches (``DSRAY_HOME``, default ``~/.cache/dsray``)."""
    return Path(os.environ.get("DSRAY_HOME", Path.home() / ".cache" / "dsray")).expanduser()


def num_threads() -> int | None:
    """Torch intra-op threads for model compute (``DSRAY_NUM_THREADS``); None keeps torch's default."""
    value = os.environ.get("DSRAY_NUM_THREADS")
    return int(value) if value else None
