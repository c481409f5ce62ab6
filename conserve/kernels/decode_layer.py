"""Whole decoder layers of a bf16 decode step in one compiled call each (decode_layer.c).

Used for steps whose rows are all decodes and at most `NATIVE_ROWS` of them, when the model's
linear layers have their weights packed for the compiled kernel (`LlamaModel.use_fast_layers`)
and the KV cache is bf16. Larger steps, prefill chunks, other dtypes: the torch layer path.
"""

from __future__ import annotations

import ctypes
import os

import torch

from conserve.kernels import CpuKernels

# Decode steps of at most this many rows run natively (see the module docstring). With more
# rows the compiled linear kernel is bound by its dot-product rate, not by the weight stream,
# and oneDNN's matmuls win back what the native layer saves: `bench roofline` with
# CONSERVE_NATIVE_ROWS=4 or 8 showed no steady gain at 4-8 rows on the development CPU.
NATIVE_ROWS = int(os.environ.get("CONSERVE_NATIVE_ROWS", "2"))


class LayerDims(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "hidden",
            "heads",
            "kv_heads",
            "head_dim",
            "inter",
            "num_blocks",
            "block_size",
            "max_blocks",
        )
    ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecode:
    """The per-layer arguments that do not change between steps, and the call."""

    def __init__(self, kernels: CpuKernels, model, k_cache: torch.Tensor, v_cache: torch.Tensor):
        cfg = model.config
        self.fn = kernels.decode_layer
        self.cfg = cfg
        self.k, self.v = k_cache, v_cache  # [L, Hkv, NB, BS, D]
        self.keep: list[torch.Tensor] = []  # tensors whose pointers are held
        self.layers = []
        for layer in model.layers:
            norms = [
                self._hold(n.weight.detach().contiguous())
                for n in (layer.input_norm, layer.post_attention_norm)
            ]
            fast = [m.fast for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
            bias = None if fast[0].bias is None else self._hold(fast[0].bias)
            qkv, o, gate_up, down = (f.packed.data_ptr() for f in fast)
            # in the order decode_layer_bf16 takes them
            self.layers.append(
                (norms[0].data_ptr(), norms[1].data_ptr(), qkv, _ptr(bias), o, gate_up, down)
            )
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim**-0.5
        self.work: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        self.keep.append(t)
        return t

    @staticmethod
    def usable(model, k_cache: torch.Tensor) -> bool:
        """Whether this model and cache can run layers natively."""
        lin = model.layers[0].qkv.fast if len(model.layers) else None
        cfg = model.config
        return (
            lin is not None
            and lin.packed is not None
            and k_cache.dtype == torch.bfloat16
            # what paged_attention.c takes: head size, query heads per KV head, block size
            and cfg.head_dim <= 256
            and cfg.num_heads // cfg.num_kv_heads <= 32
            and k_cache.shape[-2] <= 256
        )

    def step(self, rows: int, cos: torch.Tensor, sin: torch.Tensor, meta) -> NativeStep:
        """The call for one step of `rows` decode rows (`meta`: its AttentionMetadata)."""
        assert rows <= NATIVE_ROWS and meta.num_decodes == rows
        cfg = self.cfg
        if rows not in self.work:
            q, kv = cfg.q_size, cfg.kv_size
            n = rows * (2 * cfg.hidden_size + 2 * q + 2 * kv + 3 * cfg.intermediate_size)
            self.work[rows] = (
                torch.empty(n, dtype=torch.bfloat16),
                torch.empty(2 * rows * q, dtype=torch.float32),
            )
        l_, hkv, nb, bs, d = self.k.shape
        dims = LayerDims(
            cfg.hidden_size,
            cfg.num_heads,
            hkv,
            d,
            cfg.intermediate_size,
            nb,
            bs,
            meta.decode_max_blocks,
            self.eps,
            self.scale,
        )
        return NativeStep(self, rows, cos.contiguous(), sin.contiguous(), meta, dims)


class NativeStep:
    def __init__(self, nd: NativeDecode, rows, cos, sin, meta, dims) -> None:
        self.nd, self.rows, self.cos, self.sin, self.meta, self.dims = (
            nd,
            rows,
            cos,
            sin,
            meta,
            dims,
        )
        self.tables = meta.decode_block_ids.view(rows, meta.decode_max_blocks)
        self.times = (ctypes.c_double * 3)()

    def run_layer(self, i: int, h: torch.Tensor, timed: bool = False) -> None:
        """Layer `i` on h [rows, hidden] bf16 (contiguous), in place."""
        nd, meta = self.nd, self.meta
        work, fwork = nd.work[self.rows]
        rc = nd.fn(
            h.data_ptr(),
            self.rows,
            ctypes.addressof(self.dims),
            *nd.layers[i],
            self.cos.data_ptr(),
            self.sin.data_ptr(),
            nd.k[i].data_ptr(),
            nd.v[i].data_ptr(),
            meta.slot_mapping.data_ptr(),
            self.tables.data_ptr(),
            meta.decode_lens.data_ptr(),
            work.data_ptr(),
            fwork.data_ptr(),
            torch.get_num_threads(),
            self.times if timed else None,
        )
        if rc != 0:
            raise ValueError("decode_layer_bf16: unsupported shapes")
