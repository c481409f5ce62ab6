"""Where conserve keeps what it can rebuild: converted tokenizers, compiled kernels, latency
profiles. One place, so that tests can point all of it at a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$CONSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/conserve` (default `~/.cache/conserve`)."""
    root = os.environ.get("CONSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "conserve"
    )
    return Path(root)
