"""The decoder layers of a bf16 decode step in one compiled call (decode_layer.c).

Used for steps whose rows are all decodes and at most `native_rows()` of them, when the model's
linear layers have their weights packed for the compiled kernel (`LlamaModel.use_fast_layers`)
and the KV cache is bf16. Larger steps, prefill chunks, other dtypes: the torch layer path.
"""

from __future__ import annotations

import ctypes
import os

import torch

from conserve.kernels import CpuKernels
from conserve.platform import cpu_flags

# How many rows a decode step may have and still run natively (see the module docstring).
# Measured with `bench roofline` and CONSERVE_NATIVE_ROWS set (benchmarks/results/
# native-rows-20261204.md):
# - on a CPU with AMX (Intel Xeon, 2 cores), oneDNN's AMX matmuls outran the compiled
#   dot-product kernel from 4 rows on and won back what the native layer saves: no steady gain
#   at 4-8 rows, so steps of more than AMX_NATIVE_ROWS rows take the torch layers there;
# - on a CPU with AVX512-BF16 and no AMX (AMD EPYC, 2 cores), in two alternated rounds the
#   native layers took 0.45-0.84x the torch layers' step time at 4-128 rows and 0.94-1.01x at
#   256: oneDNN's bf16 matmuls there ran no faster than the compiled kernel, and the torch
#   layer path adds ~30 dispatched ops per layer.
AMX_NATIVE_ROWS = 2
NATIVE_ROWS = 256


def native_rows() -> int:
    """The most rows of a decode step that runs natively on this machine
    (CONSERVE_NATIVE_ROWS overrides it)."""
    env = os.environ.get("CONSERVE_NATIVE_ROWS")
    if env:
        return max(0, int(env))
    return AMX_NATIVE_ROWS if "amx_bf16" in cpu_flags() else NATIVE_ROWS


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


class LayerWeights(ctypes.Structure):
    """A layer's packed weights and K/V cache, as decode_layer.c's `struct layer_weights`."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "in_norm",
            "post_norm",
            "qkv",
            "qkv_b",
            "o",
            "gate_up",
            "down",
            "k_cache",
            "v_cache",
        )
    ]


class NativeDecode:
    """The per-layer arguments that do not change between steps, and the call."""

    def __init__(self, kernels: CpuKernels, model, k_cache: torch.Tensor, v_cache: torch.Tensor):
        cfg = model.config
        self.fn = kernels.decode_layers
        self.cfg = cfg
        self.k, self.v = k_cache, v_cache  # [L, Hkv, NB, BS, D]
        self.keep: list[torch.Tensor] = []  # tensors whose pointers are held
        layers = []
        for layer, k, v in zip(model.layers, k_cache, v_cache, strict=True):
            norms = [
                self._hold(n.weight.detach().contiguous())
                for n in (layer.input_norm, layer.post_attention_norm)
            ]
            fast = [m.fast for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
            bias = None if fast[0].bias is None else self._hold(fast[0].bias).data_ptr()
            qkv, o, gate_up, down = (f.packed.data_ptr() for f in fast)
            ptrs = (norms[0].data_ptr(), norms[1].data_ptr(), qkv, bias, o, gate_up, down)
            layers.append(LayerWeights(*ptrs, k.data_ptr(), v.data_ptr()))
        self.layers = (LayerWeights * len(layers))(*layers)
        self.eps, self.scale = cfg.rms_norm_eps, cfg.head_dim**-0.5
        # scratch for the largest step so far (a smaller step uses its front part)
        self.work = torch.empty(0, dtype=torch.bfloat16)
        self.fwork = torch.empty(0, dtype=torch.float32)
        self.max_rows = native_rows()

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
        assert rows <= self.max_rows and meta.num_decodes == rows
        cfg = self.cfg
        q, kv = cfg.q_size, cfg.kv_size
        n = rows * (2 * cfg.hidden_size + 2 * q + 2 * kv + 3 * cfg.intermediate_size)
        if self.work.numel() < n:
            self.work = torch.empty(n, dtype=torch.bfloat16)
            self.fwork = torch.empty(2 * rows * q, dtype=torch.float32)
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
        # the arguments after `first, last`, the same for every call of the step (not the
        # scratch: a step run while this one is stopped may replace it with a larger one)
        self.args = (
            self.cos.data_ptr(),
            self.sin.data_ptr(),
            meta.slot_mapping.data_ptr(),
            self.tables.data_ptr(),
            meta.decode_lens.data_ptr(),
        )
        self.threads = torch.get_num_threads()

    def run(
        self,
        h: torch.Tensor,
        first: int,
        last: int,
        timed: bool = False,
        stop: ctypes.c_int | None = None,
        done: ctypes.c_int64 | None = None,
        every: int = 1,
        fresh: bool = True,
    ) -> int:
        """Layers [first, last) on h [rows, hidden] bf16 (contiguous), in place. With `stop`,
        a flag another thread may set while this runs, the call stops before the first layer
        from there on that is a multiple of `every` (not `first` when `fresh`) and finds it
        set; `done` is kept at the layer running. Returns the layer it stopped before (`last`
        when all ran)."""
        nd = self.nd
        at = nd.fn(
            h.data_ptr(),
            self.rows,
            ctypes.byref(self.dims),
            nd.layers,
            first,
            last,
            *self.args,
            nd.work.data_ptr(),
            nd.fwork.data_ptr(),
            self.threads,
            self.times if timed else None,
            None if stop is None else ctypes.byref(stop),
            None if done is None else ctypes.byref(done),
            every,
            int(fresh),
        )
        if at < 0:
            raise ValueError("decode_layers_bf16: unsupported shapes")
        return at
