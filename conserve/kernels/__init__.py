"""Optional compiled CPU kernels, built on first use and cached.

The engine works without them (pure PyTorch paths); with them, decode attention reads the paged
KV cache in place instead of gathering it. Set CONSERVE_KERNELS=0 to disable.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

from conserve.platform import cpu_flags

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("paged_attention.cpp")


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None when disabled or the build fails (logged once)."""
    if os.environ.get("CONSERVE_KERNELS", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    from conserve.model.tokenizer import cache_dir

    # -march=native: the build is only valid on this CPU model, so it is part of the key.
    key = hashlib.sha256(
        _SOURCE.read_bytes() + torch.__version__.encode() + " ".join(sorted(cpu_flags())).encode()
    ).hexdigest()[:16]
    build = cache_dir() / "kernels" / key
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load(
            name=f"conserve_cpu_{key}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("compiled CPU kernels unavailable, using PyTorch attention: %s", e)
        return None
