"""Optional compiled CPU kernels, built on first use with the system C compiler and cached.

The engine works without them (pure PyTorch paths); with them, decode attention reads the paged
KV cache in place instead of gathering it. The kernel is plain C (no PyTorch headers, builds in
about a second) called through ctypes. Set CONSERVE_KERNELS=0 to disable.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from conserve.platform import cpu_flags

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("paged_attention.c")
# The reassociation flags let the compiler vectorize the dot products. Not -ffast-math: a
# shared library built with it switches the whole process to flush-to-zero when loaded.
_FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-freciprocal-math",
    "-fopenmp",
    "-shared",
    "-fPIC",
]


class CpuKernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.paged_decode_attention
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn.argtypes = (
            [ptr, ptr, ptr, ptr, ctypes.c_int, ptr, ptr]
            + [i64] * 7
            + [ctypes.c_float, ctypes.c_int]
        )
        self._fn.restype = ctypes.c_int

    def paged_decode_attention(
        self,
        out: torch.Tensor,  # [B, Hq, D] float32
        q: torch.Tensor,  # [B, Hq, D] float32
        k_cache: torch.Tensor,  # [Hkv, NB, BS, D]
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [B, MB] int64
        context_lens: torch.Tensor,  # [B] int64
        scale: float,
    ) -> None:
        for t in (out, q, k_cache, v_cache, block_tables, context_lens):
            assert t.is_contiguous() and t.device.type == "cpu"
        assert q.dtype == out.dtype == torch.float32 and k_cache.dtype == v_cache.dtype
        assert k_cache.dtype in (torch.float32, torch.bfloat16)
        assert block_tables.dtype == context_lens.dtype == torch.int64
        b, hq, d = q.shape
        hkv, nb, bs, _ = k_cache.shape
        rc = self._fn(
            out.data_ptr(),
            q.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            int(k_cache.dtype == torch.bfloat16),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            b,
            hq,
            hkv,
            nb,
            bs,
            d,
            block_tables.shape[1],
            scale,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise ValueError("paged_decode_attention: unsupported shapes")


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or None when disabled or the build fails (logged once)."""
    if os.environ.get("CONSERVE_KERNELS", "1") == "0":
        return None
    from conserve.paths import cache_dir

    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        log.warning("no C compiler found: using PyTorch attention")
        return None
    # -march=native: the build is only valid on this CPU model, so its flags are in the key.
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join(_FLAGS + sorted(cpu_flags())).encode()
    ).hexdigest()[:16]
    lib_path = cache_dir() / "kernels" / f"paged_attention-{key}.so"
    try:
        if not lib_path.is_file():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run(
                [cc, *_FLAGS, str(_SOURCE), "-o", str(tmp), "-lm"],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(tmp, lib_path)  # atomic: concurrent builders never load a partial file
        return CpuKernels(ctypes.CDLL(str(lib_path)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("compiled CPU kernels unavailable, using PyTorch attention: %s", detail[-500:])
        return None
