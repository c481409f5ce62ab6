"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) written for a paged-KV engine.

The model does not own a forward loop over layers: the runner calls `embed`, each layer and
`logits` itself, so that it can stop between layers and so that attention over the paged KV cache
(which depends on batch metadata the model knows nothing about) is passed in as a callable.

Numerics follow the reference implementation (RMSNorm in float32, RoPE tables computed in float32
and cast to the activation dtype, residual adds in the activation dtype) so that float32 outputs
match it token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from conserve.hugepages import Arena
from conserve.kernels import CpuKernels, packed_shape
from conserve.kernels.linear import ONEDNN_ROWS, FastLinear, kernel_rows, onednn_bf16
from conserve.model.config import ModelConfig, RopeScaling

# attention(layer_idx, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]) -> out [N, Hq * D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Linear(nn.Module):
    """y = x @ W^T + b with W stored transposed, [in, out] contiguous.

    On the development CPU the [in, out] layout with `torch.mm` ran small-batch (decode) matmuls
    faster than `F.linear` on [out, in] weights; at large batch they tie.
    `load_hf_weight` takes the usual [out, in] checkpoint tensor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # bf16 on CPUs: the same product on weights prepacked once (`LlamaModel.use_fast_layers`)
        self.fast: FastLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in] -> [N, out]
        if self.fast is not None and x.dtype == torch.bfloat16:
            return self.fast(x)
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops: CpuKernels | None = None  # bf16 on CPUs: the compiled op (use_fast_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.ops is not None and dtype == torch.bfloat16 and x.dim() == 2:
            return self.ops.rms_norm_bf16(x, self.weight, self.eps)
        if dtype == torch.float32:  # one fused kernel; same math as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], float32, with Llama 3 / linear scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, and the band in
        # between interpolated smoothly (Llama 3.1 long-context recipe).
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryTable:
    """cos/sin for every position up to `max_positions`, computed once in float32."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device) -> None:
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        # -> cos, sin: [N, 1, D] in the activation dtype
        return (
            self.cos.index_select(0, positions).to(dtype).unsqueeze(1),
            self.sin.index_select(0, positions).to(dtype).unsqueeze(1),
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [N, H, D]; rotate-half convention (first half pairs with second half)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # q, k and v projections fused into one matmul; gate and up likewise.
        self.qkv = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size)
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.intermediate_size = cfg.intermediate_size
        # bf16 on CPUs: RoPE and SiLU(gate) * up as compiled ops (LlamaModel.use_fast_layers)
        self.ops: CpuKernels | None = None

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn
    ) -> torch.Tensor:
        # h: [N, hidden]
        h = self.attend(h, cos, sin, attention)
        return h + self.mlp(h)

    def attend(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionFn
    ) -> torch.Tensor:
        """The attention half of the layer, with its residual: a new [N, hidden] tensor."""
        return self.attended(h, attention(self.layer_idx, *self.project(h, cos, sin)))

    def project(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, Hq, D], k and v [N, Hkv, D] for the attention, rotated."""
        n = h.shape[0]
        qkv = self.qkv(self.input_norm(h))
        if self.ops is not None and qkv.dtype == torch.bfloat16:
            heads, d = self.num_heads + self.num_kv_heads, self.head_dim
            self.ops.rope_bf16(qkv, cos[:, 0], sin[:, 0], heads, d)  # in place
            q = qkv[:, : self.q_size].view(n, self.num_heads, d)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, d)
            return q, k, qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, d)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads rotated in one pass: [N, Hq + Hkv, D]
        qk = apply_rope(qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v.view(n, self.num_kv_heads, self.head_dim)

    def attended(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The attention half's output projection and residual, from the attention `a`."""
        return h + self.o_proj(a)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The feed-forward half of the layer, without its residual."""
        gate_up = self.gate_up(self.post_attention_norm(h))
        if self.ops is not None and gate_up.dtype == torch.bfloat16:
            return self.down(self.ops.silu_mul_bf16(gate_up))
        gate, up = gate_up.split(self.intermediate_size, -1)
        return self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # With tied embeddings this holds a transposed copy of the embedding matrix: the
        # gather in `embed` wants rows of [vocab, hidden], the matmul wants [hidden, vocab].
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)

    def use_fast_layers(self, kernels: CpuKernels | None) -> str:
        """Run the bf16 layers on prepacked weights (kernels/linear.py): the compiled kernel when
        `kernels` is given (for every step on CPUs where it beats oneDNN, else for steps of few
        rows), oneDNN up to 256 rows when torch has it; and
        with `kernels`, RMSNorm, RoPE and SiLU(gate) * up as compiled ops (ops_bf16.c).
        Nothing changes for other dtypes or devices. Returns what runs, for the log."""
        first = self.lm_head.weight_t
        if first.dtype != torch.bfloat16 or first.device.type != "cpu":
            return "torch"
        onednn = onednn_bf16()
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        # the packed weights side by side on huge pages: a decode step streams all of them
        arena = None
        if kernels is not None:
            arena = Arena(
                sum(Arena.room(packed_shape(*m.weight_t.shape), first.dtype) for m in linears)
            )
        for mod in linears:
            mod.fast = FastLinear(mod.weight_t.detach(), mod.bias, kernels, onednn, arena=arena)
        for mod in self.modules():
            if isinstance(mod, RMSNorm | DecoderLayer):
                mod.ops = kernels
        ops = ", compiled RMSNorm/RoPE/SiLU" if kernels is not None else ""
        if kernels is not None and kernel_rows() >= ONEDNN_ROWS:
            return "compiled kernel" + ops
        small = f"compiled kernel up to {kernel_rows()} rows, " if kernels is not None else ""
        return small + ("oneDNN prepacked" if onednn else "torch") + ops

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [N] -> [N, hidden]
        return self.embed_tokens(input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        # h: [M, hidden] (only the rows that sample) -> [M, vocab] in the model's dtype (the
        # sampler converts what it needs to float32)
        return self.lm_head(self.norm(h))
