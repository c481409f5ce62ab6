"""Optional compiled CPU kernels, built on first use with the system C compiler and cached.

The engine works without them (pure PyTorch paths); with them, decode attention reads the paged
KV cache in place instead of gathering it, and bf16 models run their linear layers on prepacked
weights (`linear.py`), their per-layer small ops compiled, and the layers of decode steps in one
call (`decode_layer.py`). The kernels are plain C (no PyTorch
headers, they build in a few seconds) called through ctypes. Set CONSERVE_KERNELS=0 to disable.
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

from conserve.hugepages import Arena
from conserve.platform import cpu_flags

log = logging.getLogger(__name__)
_SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "paged_attention.c",
        "prefill_attention.c",
        "linear_bf16.c",
        "decode_layer.c",
        "ops_bf16.c",
        "stream_read.c",
    )
]
_HEADERS = [Path(__file__).with_name("simd.h")]  # included by the sources: part of the key
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
    def __init__(self, lib: ctypes.CDLL, fingerprint: str = "custom") -> None:
        # which build this is (sources and CPU flags): latency profiles made with other
        # kernels are not reused
        self.fingerprint = fingerprint
        self._fn = lib.paged_decode_attention
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn.argtypes = (
            [ptr, ptr, ptr, ptr, ctypes.c_int, ptr, ptr]
            + [i64] * 7
            + [ctypes.c_float, ctypes.c_int]
        )
        self._fn.restype = ctypes.c_int
        self._linear = lib.linear_bf16
        self._linear.argtypes = [ptr] * 4 + [i64] * 4 + [ctypes.c_int]
        self._linear.restype = None
        # decode_layer.c: a decode step's layers in one call (kernels/decode_layer.py holds the
        # args): h, rows, dims, weights, first, last, cos, sin, slots, tables, lens, work, fwork,
        # threads, times, stop, done, every, fresh
        self.decode_layers = lib.decode_layers_bf16
        self.decode_layers.argtypes = (
            [ptr, i64, ptr, ptr, i64, i64]
            + [ptr] * 7
            + [ctypes.c_int]
            + [ptr] * 3
            + [i64]
            + [ctypes.c_int]
        )
        self.decode_layers.restype = i64
        # ops_bf16.c
        f32, cint = ctypes.c_float, ctypes.c_int
        self._rms_norm = lib.rms_norm_bf16
        self._rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, i64, f32, cint]
        self._silu_mul = lib.silu_mul_bf16
        self._silu_mul.argtypes = [ptr, ptr, i64, i64, cint]
        self._rope = lib.rope_bf16
        self._rope.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, cint]
        for fn in (self._rms_norm, self._silu_mul, self._rope):
            fn.restype = None
        # stream_read.c (bench roofline's bandwidth probe)
        self._stream_read = lib.stream_read_u64
        self._stream_read.argtypes = [ptr, i64, cint]
        self._stream_read.restype = ctypes.c_uint64
        # prefill_attention.c
        self._prefill_ok = lib.prefill_attention_supported
        self._prefill_ok.argtypes = [i64] * 3
        self._prefill_ok.restype = cint
        self._prefill_scratch = lib.prefill_attention_scratch
        self._prefill_scratch.argtypes = [i64] * 3
        self._prefill_scratch.restype = i64
        self._prefill = lib.paged_prefill_attention_bf16
        self._prefill.argtypes = [ptr, i64, ptr, i64] + [ptr] * 3 + [i64] * 7 + [f32, ptr, cint]
        self._prefill.restype = cint

    def prefill_attention_supported(self, hq: int, hkv: int, d: int) -> bool:
        """Whether `paged_prefill_attention_bf16` runs these head shapes on this build (it
        needs AVX512-BF16)."""
        return bool(self._prefill_ok(hq, hkv, d))

    def prefill_attention_scratch(self, hkv: int, context_len: int, d: int) -> int:
        """Bytes of scratch the prefill attention needs for a context of this length."""
        return int(self._prefill_scratch(hkv, context_len, d))

    def paged_prefill_attention_bf16(
        self,
        out: torch.Tensor,  # [T, Hq, D] bf16, rows may be strided
        q: torch.Tensor,  # [T, Hq, D] bf16, rows may be strided
        k_cache: torch.Tensor,  # [Hkv, NB, BS, D] bf16, holding the chunk's K/V too
        v_cache: torch.Tensor,
        block_ids: torch.Tensor,  # [>= ceil(L / BS)] int64: the sequence's blocks
        context_len: int,  # L: the chunk's queries sit at positions L - T .. L - 1
        scale: float,
        scratch: torch.Tensor,  # uint8, >= prefill_attention_scratch(...) bytes
    ) -> None:
        """Causal attention of a prefill chunk over its sequence's paged K/V (bf16)."""
        t, hq, d = q.shape
        hkv, nb, bs, _ = k_cache.shape
        for x in (q, out):
            assert x.dtype == torch.bfloat16 and x.stride(2) == 1 and x.stride(1) == d
        assert out.shape == q.shape and k_cache.dtype == v_cache.dtype == torch.bfloat16
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        assert block_ids.dtype == torch.int64 and block_ids.is_contiguous()
        assert block_ids.numel() * bs >= context_len >= t
        assert scratch.numel() >= self.prefill_attention_scratch(hkv, context_len, d)
        rc = self._prefill(
            out.data_ptr(),
            out.stride(0),
            q.data_ptr(),
            q.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_ids.data_ptr(),
            t,
            context_len,
            hq,
            hkv,
            nb,
            bs,
            d,
            scale,
            scratch.data_ptr(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise ValueError("paged_prefill_attention_bf16: unsupported shapes")

    def stream_read(self, buf: torch.Tensor) -> int:
        """Read a contiguous CPU tensor once with every thread (a bandwidth probe); returns the
        wrapping sum of its 64-bit words. Its size must be a multiple of 64 bytes."""
        assert buf.is_contiguous() and buf.device.type == "cpu"
        nbytes = buf.numel() * buf.element_size()
        assert nbytes % 64 == 0, "stream_read: size must be a multiple of 64 bytes"
        return int(self._stream_read(buf.data_ptr(), nbytes, torch.get_num_threads()))

    def rms_norm_bf16(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of x [M, n] bf16 (rows may be strided) by weight [n] bf16."""
        m, n = x.shape
        assert x.dtype == weight.dtype == torch.bfloat16 and x.stride(1) == 1
        assert weight.is_contiguous() and weight.numel() == n
        out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
        self._rms_norm(
            out.data_ptr(),
            x.data_ptr(),
            weight.data_ptr(),
            m,
            n,
            x.stride(0),
            eps,
            torch.get_num_threads(),
        )
        return out

    def silu_mul_bf16(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for gate_up [M, 2I] bf16 (contiguous): [M, I]."""
        m, two_i = gate_up.shape
        assert gate_up.dtype == torch.bfloat16 and gate_up.is_contiguous() and two_i % 2 == 0
        out = torch.empty(m, two_i // 2, dtype=torch.bfloat16, device=gate_up.device)
        self._silu_mul(out.data_ptr(), gate_up.data_ptr(), m, two_i // 2, torch.get_num_threads())
        return out

    def rope_bf16(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int
    ) -> None:
        """Rotate the first `heads` heads of each row of x [M, >= heads * head_dim] bf16 in
        place (rotate-half RoPE); cos, sin [M, head_dim] bf16, contiguous."""
        m = x.shape[0]
        assert x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.stride(1) == 1
        assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == (m, head_dim)
        assert x.shape[1] >= heads * head_dim
        self._rope(
            x.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            m,
            heads,
            head_dim,
            x.stride(0),
            torch.get_num_threads(),
        )

    def linear_bf16(
        self,
        x: torch.Tensor,  # [M, K] bf16, rows may be strided
        packed: torch.Tensor,  # `pack_linear_weight(weight_t)`
        k: int,
        n: int,
        bias: torch.Tensor | None = None,  # [N] bf16
    ) -> torch.Tensor:
        """y = x W (+ bias): [M, N] bf16, W [K, N] given prepacked."""
        assert x.dtype == packed.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] == k
        if x.stride(1) != 1:
            x = x.contiguous()
        assert bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())
        y = torch.empty(x.shape[0], n, dtype=torch.bfloat16, device=x.device)
        self._linear(
            y.data_ptr(),
            x.data_ptr(),
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            x.shape[0],
            k,
            n,
            x.stride(0),
            torch.get_num_threads(),
        )
        return y

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


def c_compiler() -> str | None:
    """The C compiler the kernels are built with: $CC, else gcc or cc on the PATH."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(sources: list[Path], out: Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile `sources` into the shared library `out` (raises CalledProcessError)."""
    subprocess.run(
        [c_compiler() or "cc", *_FLAGS, *extra_flags, *map(str, sources), "-o", str(out), "-lm"],
        check=True,
        capture_output=True,
        text=True,
    )


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or None when disabled or the build fails (logged once)."""
    if os.environ.get("CONSERVE_KERNELS", "1") == "0":
        return None
    from conserve.paths import cache_dir

    cc = c_compiler()
    if cc is None:
        log.warning("no C compiler found: using PyTorch paths")
        return None
    # -march=native: the build is only valid on this CPU model, so its flags are in the key.
    source = b"".join(p.read_bytes() for p in [*_SOURCES, *_HEADERS])
    key = hashlib.sha256(source + " ".join(_FLAGS + sorted(cpu_flags())).encode()).hexdigest()
    lib_path = cache_dir() / "kernels" / f"conserve-kernels-{key[:16]}.so"
    try:
        if not lib_path.is_file():
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
            build(_SOURCES, tmp)
            os.replace(tmp, lib_path)  # atomic: concurrent builders never load a partial file
        return CpuKernels(ctypes.CDLL(str(lib_path)), key[:16])
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("compiled CPU kernels unavailable, using PyTorch paths: %s", detail[-500:])
        return None


BLOCK = 32  # output columns per packed block (linear_bf16.c)


def packed_shape(k: int, n: int) -> tuple[int, int, int, int]:
    """The shape `pack_linear_weight` gives a [k, n] weight."""
    return (-(-n // BLOCK), (k + 1) // 2, BLOCK, 2)


def pack_linear_weight(weight_t: torch.Tensor, arena: Arena | None = None) -> torch.Tensor:
    """W [K, N] in the layout linear_bf16.c streams: blocks of 32 output columns, each
    contiguous, pairs of inputs interleaved; K padded to even and N to a whole block with
    zeros. With `arena` (CPU weights), the result is placed there (huge pages, see
    conserve/hugepages.py)."""
    k, n = weight_t.shape
    kp, np_ = k + k % 2, -(-n // BLOCK) * BLOCK
    w = torch.zeros(kp, np_, dtype=weight_t.dtype, device=weight_t.device)
    w[:k, :n] = weight_t
    packed = w.view(kp // 2, 2, np_ // BLOCK, BLOCK).permute(2, 0, 3, 1)
    if arena is None:
        return packed.contiguous()
    return arena.take(tuple(packed.shape), weight_t.dtype).copy_(packed)
