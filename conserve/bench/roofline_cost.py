"""The two floors of a model step: bytes that must move and FLOPs that must be computed, per
part, from the model's own shapes; and this machine's memory bandwidth and peak GEMM rate,
measured.

A step computes `rows` tokens for `seqs` sequences. It must read every weight of the decoder
layers once, the vocabulary projection once if any row samples, the cached K/V its queries
attend to, and write the K/V of its new tokens. Activations are left out (small next to these
at the batch sizes measured); so is the embedding table, of which a step reads one row per
token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from conserve.kernels import cpu_kernels
from conserve.model.llama import LlamaModel


@dataclass(frozen=True)
class StepShape:
    kind: str  # "decode" or "prefill"
    rows: int  # tokens computed
    seqs: int  # sequences (one per decode row; one for a prefill chunk)
    sample_rows: int  # rows that go through the vocabulary projection
    attended: int  # sum over rows of the tokens each row attends to (itself included)
    cached: int  # K/V tokens read from the cache (sum over sequences)

    @property
    def label(self) -> str:
        if self.kind == "decode":
            return f"decode x{self.seqs}"
        ctx = self.cached // max(1, self.seqs)
        return f"prefill {self.rows}" + (f" +{ctx} cached" if ctx else "")


@dataclass(frozen=True)
class PartCost:
    bytes: float
    flops: float

    def floor_s(self, bandwidth: float, peak: float) -> float:
        return max(self.bytes / bandwidth, self.flops / peak)


def step_costs(model: LlamaModel, shape: StepShape, kv_elem: int) -> dict[str, PartCost]:
    """Bytes and FLOPs of the linear layers, the attention (K/V read and written) and the
    vocabulary projection of one step of `shape`."""
    cfg = model.config
    layer_params = sum(
        m.weight_t.numel()
        for layer in model.layers
        for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
    )
    elem = model.lm_head.weight_t.element_size()
    head_params = model.lm_head.weight_t.numel()
    kv_per_token = 2 * cfg.num_layers * cfg.kv_size * kv_elem
    attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * shape.attended
    return {
        "linear": PartCost(layer_params * elem, 2.0 * shape.rows * layer_params),
        "attention": PartCost((shape.cached + shape.rows) * kv_per_token, attn_flops),
        "lm_head": PartCost(
            head_params * elem if shape.sample_rows else 0, 2.0 * shape.sample_rows * head_params
        ),
    }


def total_cost(costs: dict[str, PartCost]) -> PartCost:
    return PartCost(sum(c.bytes for c in costs.values()), sum(c.flops for c in costs.values()))


def _best_s(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(size_bytes: int = 1 << 30, reps: int = 5) -> dict[str, float]:
    """Bytes/s of reading a `size_bytes` tensor (torch's sum over it, and the compiled read
    probe when the kernels are there) and of copying it (read + write counted), best of
    `reps`. The floors use the largest: what this machine showed it can move."""
    src = torch.ones(size_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    read = size_bytes / _best_s(src.sum, reps)
    copy = 2 * size_bytes / _best_s(lambda: dst.copy_(src), reps)
    out = {"read": read, "copy": copy}
    kernels = cpu_kernels()
    if kernels is not None:
        out["read_loads"] = size_bytes / _best_s(lambda: kernels.stream_read(src), reps)
    return out | {"bandwidth": max(out.values())}


def measure_peak_flops(dtype: torch.dtype, reps: int = 3) -> dict[str, float]:
    """FLOP/s of torch's matrix multiply in `dtype` on square matrices of a few sizes, best
    of `reps` each; the peak is the best of them."""
    rates = {}
    for n in (1024, 2048, 3072):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        rates[f"gemm {n}"] = 2.0 * n**3 / _best_s(lambda a=a, b=b: torch.mm(a, b), reps)
    return rates | {"peak": max(rates.values())}
