"""One frozen configuration tree. "auto" values are resolved once, at engine start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from conserve.platform import cpu_has_native_bf16

DEFAULT_KV_CACHE_GB = 4.0
POLICIES = ("online-only", "fcfs", "priority", "conserve")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens computed per step
    max_prefill_chunk: int | None = None  # per-request cap on tokens per step (None: the budget)
    # online-only | fcfs | priority | conserve (see conserve/engine/policy.py)
    policy: str = "fcfs"
    # absolute online objectives, seconds; None: "as if alone" (each request's own predicted
    # alone latency plus slo_slack)
    tpot_slo: float | None = None
    ttft_slo: float | None = None
    slo_margin: float = 0.1  # absolute TPOT: offline work fills the SLO minus this fraction
    # relative objectives: online latency may exceed the predicted alone latency by this fraction
    slo_slack: float = 0.05
    # conserve, no online work: predicted seconds per step for offline prompt chunks (None:
    # OFFLINE_STEP_MULTIPLE times a one-token step, from the latency profile)
    offline_step_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError("max_prefill_chunk must be positive")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        for name in ("tpot_slo", "ttft_slo"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.slo_margin < 1:
            raise ValueError("slo_margin must be in [0, 1)")
        if not 0 <= self.slo_slack <= 10:
            raise ValueError("slo_slack must be in [0, 10]")
        if self.offline_step_s is not None and not self.offline_step_s > 0:
            raise ValueError("offline_step_s must be positive")

    @property
    def chunk_cap(self) -> int:
        return self.max_prefill_chunk or self.max_num_batched_tokens


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_gb: float | None = None  # None: DEFAULT_KV_CACHE_GB, capped by free memory
    num_blocks: int | None = None  # exact pool size, overrides kv_cache_gb (tests)
    enable_prefix_caching: bool = True
    # host tier for offline KV checkpoints (conserve policy); 0 turns it off
    host_kv_gb: float = 2.0
    # a directory that backs the host tier, so that its checkpoints outlive the engine
    host_kv_path: str | None = None
    # a host tier in memory only gets checkpoints while less than this share of the device
    # pool is free (1: after every step); one with a host_kv_path gets them after every step
    host_kv_checkpoint_free: float = 0.5

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if not 0 <= self.host_kv_checkpoint_free <= 1:
            raise ValueError("host_kv_checkpoint_free must be in [0, 1]")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file, or None/"default"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda[:i]
    max_model_len: int | None = None  # None: the model's context window
    num_threads: int | None = None  # None: all cores
    seed: int = 0  # for unseeded random sampling
    # decode attention: auto (compiled CPU kernel on CPU when it builds, else torch) | torch |
    # cpu-kernel
    attention: str = "auto"
    # the decoder layers' compute: auto (bf16 on CPU: weights prepacked once at load, compiled
    # kernels for small steps' linear layers and for the per-layer small ops, whole layers
    # compiled for decode steps of a few rows, oneDNN for mid-sized matmuls) | torch
    layers: str = "auto"
    # layer-wise preemption: check for arriving online work every this many layers; the check
    # is free on the CPU and the wait is about k layers (docs/benchmarks.md, bench preempt)
    safepoint_every: int = 1
    # latency profile for the conserve policy: "auto" (cached, measured on first use) or a path
    latency_profile: str = "auto"
    # diagnostics: append one JSON line per step (times, tokens by class, prediction) here
    step_log: str | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def resolved(self) -> EngineConfig:
        """Concrete dtype and device; the model-dependent values are resolved by the engine."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype
        if dtype == "auto":
            dtype = auto_dtype(device)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
        return replace(
            self, device=device, dtype=dtype, num_threads=self.num_threads or os.cpu_count() or 1
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def auto_dtype(device: str) -> str:
    """bfloat16 where the hardware computes it natively (GPUs, CPUs with AVX512-BF16 or AMX),
    float32 elsewhere: emulated bf16 made the engine 1.6-2.6x slower than float32 on a CPU
    without it (benchmarks/results/dtype-*.md)."""
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"
