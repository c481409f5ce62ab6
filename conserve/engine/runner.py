"""Model runner: turns a `ScheduledBatch` into tensors, runs the layers, samples.

The runner owns the loop over layers (the model exposes `embed`, its layers and `logits`), so
later work can stop between layers. It reads nothing but the batch it is given.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from conserve.engine.attention import (
    AttentionCall,
    AttentionMetadata,
    PagedAttention,
    Workspace,
)
from conserve.engine.batch import (
    IterationPreempted,
    ScheduledBatch,
    ScheduledChunk,
    StepResult,
)
from conserve.engine.step_parts import StepParts
from conserve.kernels import CpuKernels
from conserve.kernels.decode_layer import NativeDecode, NativeStep
from conserve.kv.cache import KVTensors
from conserve.model.llama import LlamaModel, RotaryTable
from conserve.platform import cpu_flags
from conserve.sampling.sampler import sample
from conserve.sampling.types import SampledToken

# Steps of at least this many rows have safepoints inside each layer as well: between the
# parts of its attention (the K/V write with the decodes, then each prefill chunk) and between
# its attention and feed-forward halves. An online arrival waits for the running part of a
# step it stops: a 2048-token offline step's layer took 32 ms on a 2-core CPU (attention 58%
# of it, with two fresh 1024-token prompts), so this shortens the expected wait at no cost.
SUBLAYER_ROWS = 256
# Such a step's feed-forward half runs in slices of this many rows, with a safepoint before
# each, where the machine computes the slices as fast as the whole: the longest piece an
# arrival can wait for no longer grows with the step, so offline steps may be longer. On a
# 2-core AMD EPYC (AVX512-BF16, no AMX) 256-row slices of the bf16 feed-forward half took
# 0.93-1.04x the whole at 512-2048 rows, bit for bit the same result
# (benchmarks/results/feed-forward-slices-20261205.txt). On a CPU with AMX, oneDNN's matmuls
# gain from more rows: there 256-row slices cost 23-38% of a 2048-row step and 512-row ones
# 6-14% (benchmarks/results/coserve-diagnostics-20261202.md), so the half stays whole.
FEED_FORWARD_SLICE_ROWS = 256
# A stoppable step computes its LM head and samples in slices of at most this many rows, with a
# safepoint before each (the first one too: a stop that came during the last layer stops there).
# After the layers, a step of 240 offline decodes still had its LM head and greedy sampling to
# run, 15 ms in one piece on a 2-core CPU, which an arriving online request used to wait for in
# full; in 64-row slices the four took 14 ms together (32-row slices: 20 ms), so a wait is one
# slice, about 3.4 ms (benchmarks/results/lm-head-slices-20261203.txt).
LOGITS_SLICE_ROWS = 64


@dataclass
class _Pass:
    """One step on its way through the layers: the hidden states after `layer` layers (and
    after the attention half of layer `layer` if `attended`, or with that half's attention
    begun in `call`), and what the remaining layers need. A stopped step keeps it
    (`IterationPreempted`)."""

    h: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    attention: PagedAttention
    sample_rows: list[tuple[int, ScheduledChunk]]
    layer: int = 0
    attended: bool = False
    call: AttentionCall | None = None  # layer `layer`'s attention, begun and not finished
    native: NativeStep | None = None  # a small decode step: whole layers in compiled code
    fresh: bool = False  # a resumed pass that has run nothing yet in this call
    ff_row: int = 0  # rows of layer `layer`'s feed-forward half done (a sliced half begun)
    offline_only: bool = False  # every chunk is offline (a stopped step is kept, not dropped)
    sampled: list[SampledToken] = field(default_factory=list)  # rows sampled so far, in order


def feed_forward_slices(device: torch.device) -> int:
    """Rows per feed-forward slice in steps with safepoints inside layers on `device` (0: the
    half runs whole); see FEED_FORWARD_SLICE_ROWS."""
    if device.type != "cpu" or "amx_bf16" in cpu_flags():
        return 0
    return FEED_FORWARD_SLICE_ROWS


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv: KVTensors,
        max_model_len: int,
        device: torch.device,
        seed: int = 0,
        kernels: CpuKernels | None = None,
        safepoint_every: int = 1,
        sublayer_rows: int = SUBLAYER_ROWS,
        feed_forward_slice_rows: int | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.rope = RotaryTable(model.config, max_model_len, device)
        self.scale = model.config.head_dim**-0.5
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.workspace = Workspace()
        self.kernels = kernels
        self.safepoint_every = max(1, safepoint_every)
        self.sublayer_rows = max(1, sublayer_rows)
        # 0: the feed-forward half of a step with safepoints inside layers runs whole
        if feed_forward_slice_rows is None:
            feed_forward_slice_rows = feed_forward_slices(device)
        self.feed_forward_slice_rows = max(0, feed_forward_slice_rows)
        self._progress = 0.0  # see `progress`
        # the layer compiled decode layers are at (written by them while they run)
        self._native_at = ctypes.c_int64(0)
        self._native_running = False
        # compiled decode layers run a step's layers in one call when its stop has a flag they
        # can read (engine steps), else one call per layer
        self.native_loop = True
        # where each step's time goes, when set (the roofline benchmark; see step_parts.py)
        self.parts: StepParts | None = None
        # decode steps of at most `native.max_rows` rows (decode_layer.native_rows) run whole
        # layers in compiled code when the attention kernel is on and the model's bf16 linear
        # layers are packed for it
        self.native = (
            NativeDecode(kernels, model, kv.k, kv.v)
            if kernels is not None and NativeDecode.usable(model, kv.k)
            else None
        )

    @property
    def progress(self) -> float:
        """The fraction of the running step's layers finished (0 between steps); read by the
        preemption monitor from another thread to estimate the step's remaining time."""
        if self._native_running:
            return self._native_at.value / len(self.model.layers)
        return self._progress

    def _part(self, name: str) -> AbstractContextManager:
        return nullcontext() if self.parts is None else self.parts.part(name)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, stop: Callable[[], bool] | None = None) -> StepResult:
        """Run one step. With `stop`, it is called at every safepoint (every
        `safepoint_every` layers); when it returns True the step stops there
        (`IterationPreempted` with a continuation for `resume`): nothing is sampled and the
        caller commits nothing."""
        t0 = time.perf_counter()
        with self._part("prepare"):
            p = self._start(batch)
        return self._finish(self._layers(p, stop, resumed=False), t0, stop)

    @torch.inference_mode()
    def resume(self, continuation: _Pass, stop: Callable[[], bool] | None = None) -> StepResult:
        """Run what a stopped step has left: layers, then LM head and sampling (it may stop
        again, at a later safepoint)."""
        t0 = time.perf_counter()
        return self._finish(self._layers(continuation, stop), t0, stop)

    @torch.inference_mode()
    def forward(
        self, batch: ScheduledBatch, stop: Callable[[], bool] | None = None
    ) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run the layers; logits [M, vocab] float32 for the M chunks that sample, in order."""
        logits, chunks = self._logits(self._layers(self._start(batch), stop, resumed=False))
        return logits.float(), chunks

    def _start(self, batch: ScheduledBatch) -> _Pass:
        # Single-token chunks first: they are attended together in one batched call.
        chunks = sorted(batch.chunks, key=lambda c: c.num_tokens != 1)
        input_ids, positions, meta, sample_rows = self._prepare(chunks)
        cos, sin = self.rope.lookup(positions, self.dtype)
        attention = PagedAttention(
            self.kv, meta, self.scale, self.workspace, self.kernels, self.parts
        )
        p = _Pass(self.model.embed(input_ids), cos, sin, attention, sample_rows)
        p.offline_only = all(c.offline for c in chunks)
        rows = len(input_ids)
        if self.native is not None and rows <= self.native.max_rows and meta.num_decodes == rows:
            p.native = self.native.step(rows, cos[:, 0], sin[:, 0], meta)
        return p

    def _layers(self, p: _Pass, stop: Callable[[], bool] | None, resumed: bool = True) -> _Pass:
        """Run `p` from where it is to the last layer, or to a safepoint where `stop` says so:
        before every `safepoint_every`-th layer (the first one included: an online request
        that arrived while the step was planned stops it before any layer ran) and, in steps
        of `sublayer_rows` rows or more (with `safepoint_every` 1), inside each layer too:
        between the parts of its attention (`AttentionCall`), between its halves, and between
        the row slices of its feed-forward half (`feed_forward_slice_rows`). A `resumed` pass
        runs one part at least before it may stop again."""
        inner = (
            stop is not None and self.safepoint_every == 1 and p.h.shape[0] >= self.sublayer_rows
        )
        with self._part("layers"):
            # `fresh`: nothing has run yet in this call of a resumed pass
            return self._run_layers(p, stop, inner, fresh=resumed)

    def _run_layers(
        self, p: _Pass, stop: Callable[[], bool] | None, inner: bool, fresh: bool
    ) -> _Pass:
        every = self.safepoint_every
        layers = self.model.layers
        n = len(layers)
        try:
            while p.layer < n:
                layer = layers[p.layer]
                self._progress = p.layer / n
                if p.native is not None:
                    flag = None if stop is None else getattr(stop, "flag", None)
                    loop = self.native_loop and (stop is None or flag is not None)
                    last = n if loop else p.layer + 1
                    safepoint = stop is not None and not fresh and p.layer % every == 0
                    if not loop and safepoint and stop():
                        raise IterationPreempted(p.layer, p)
                    at = self._native_layers(p, last, flag, every, fresh)
                    if at < last:
                        raise IterationPreempted(at, p)
                    fresh = False
                    continue
                if not p.attended and p.call is None:
                    if stop is not None and not fresh and p.layer % every == 0 and stop():
                        raise IterationPreempted(p.layer, p)
                    if inner:
                        q, k, v = layer.project(p.h, p.cos, p.sin)
                        p.call = p.attention.begin(layer.layer_idx, q, k, v)
                    else:
                        p.h = layer.attend(p.h, p.cos, p.sin, p.attention)
                        p.attended = True
                    fresh = False
                if p.call is not None:
                    if not p.call.run(stop):  # its first part runs in any case
                        raise IterationPreempted(p.layer, p)
                    p.h = layer.attended(p.h, p.call.result())
                    p.call, p.attended, fresh = None, True, False
                # the feed-forward half: whole, or in row slices (each row's feed-forward is its
                # own) with a safepoint before each; a pass stopped between slices goes on there
                rows = p.h.shape[0]
                piece = (self.feed_forward_slice_rows if inner else 0) or rows
                while p.ff_row < rows:
                    if inner and not fresh and stop():
                        raise IterationPreempted(p.layer, p)
                    lo, hi = p.ff_row, min(rows, p.ff_row + piece)
                    if hi - lo == rows:
                        p.h = p.h + layer.mlp(p.h)
                    else:
                        h = p.h[lo:hi]
                        p.h[lo:hi] = h + layer.mlp(h)
                    p.ff_row, fresh = hi, False
                p.ff_row = 0
                p.layer, p.attended, fresh = p.layer + 1, False, False
        finally:
            self._progress = 0.0
        p.fresh = fresh
        return p

    def _native_layers(
        self, p: _Pass, last: int, flag: ctypes.c_int | None, every: int, fresh: bool
    ) -> int:
        """Layers p.layer to `last` in one compiled call, which stops early before a safepoint
        layer when `flag` is set. Returns (and p.layer is then) the layer it stopped before."""
        timed = self.parts is not None
        self._native_at.value = p.layer
        self._native_running = True
        try:
            at = p.native.run(p.h, p.layer, last, timed, flag, self._native_at, every, fresh)
        finally:
            self._native_running = False
        p.layer = at
        if timed:  # the layers' own split: linear layers, attention, the rest
            t = p.native.times
            self.parts.seconds["linear"] += t[0]
            self.parts.seconds["attention"] += t[1]
            t[0] = t[1] = t[2] = 0.0
        return at

    def _logits(
        self, p: _Pass, lo: int = 0, hi: int | None = None
    ) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Logits of the sampling rows [lo, hi) (all by default), and their chunks."""
        picked = p.sample_rows[lo:hi]
        if not picked:
            return torch.empty(0, self.model.config.vocab_size), []
        rows = torch.tensor([r for r, _ in picked], device=self.device)
        return self.model.logits(p.h.index_select(0, rows)), [c for _, c in picked]

    def _finish(self, p: _Pass, t0: float, stop: Callable[[], bool] | None = None) -> StepResult:
        """LM head and sampling of the rows that sample. With `stop`, in a step of offline
        work only: in slices of LOGITS_SLICE_ROWS rows with a safepoint before each
        (`IterationPreempted` after the last layer; the rows sampled so far are kept in the
        pass). A step with online work is not stopped here: the engine would drop it, and
        finishing it takes less than that would cost."""
        chunks = [c for _, c in p.sample_rows]
        stoppable = stop is not None and p.offline_only
        size = LOGITS_SLICE_ROWS if stoppable else max(1, len(chunks))
        fresh = p.fresh or not stoppable
        while len(p.sampled) < len(chunks):
            if not fresh and stop():
                raise IterationPreempted(p.layer, p)
            lo = len(p.sampled)
            hi = min(len(chunks), lo + size)
            with self._part("logits"):
                logits, _ = self._logits(p, lo, hi)
            with self._part("sampling"):
                p.sampled += sample(logits, [c.sample for c in chunks[lo:hi]], self.generator)
            fresh = not stoppable
        sampled = {c.request_id: t for c, t in zip(chunks, p.sampled, strict=True)}
        return StepResult(sampled=sampled, elapsed_s=time.perf_counter() - t0)

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[int, ScheduledChunk]]]:
        bs = self.kv.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        prefills: list[tuple[int, int, int, list[int]]] = []
        sample_rows: list[tuple[int, ScheduledChunk]] = []
        for c in chunks:
            row = len(ids)
            n_blocks = -(-c.context_len // bs)
            table = list(c.block_ids[:n_blocks])
            ids.extend(c.token_ids)
            for p in range(c.start, c.context_len):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if c.num_tokens == 1:
                dec_tables.append(table)
                dec_lens.append(c.context_len)
            else:
                prefills.append((row, c.num_tokens, c.context_len, table))
            if c.sample is not None:
                sample_rows.append((row + c.num_tokens - 1, c))
        meta = AttentionMetadata.build(dec_tables, dec_lens, prefills, slots, bs, self.device)
        dev = self.device
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            meta,
            sample_rows,
        )
