"""The contracts between scheduler, runner and engine: plain data, no scheduler objects."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field

from conserve.engine.latency import BatchShape
from conserve.sampling.types import SampledToken, SampleSpec


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute `token_ids` at positions start .. start + len - 1 of one request."""

    request_id: str
    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]  # block table covering at least start + len(token_ids) tokens
    sample: SampleSpec | None  # set when this chunk ends at the request's last known token
    offline: bool = False  # the request is offline (latency-tolerant)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class ScheduledBatch:
    chunks: Sequence[ScheduledChunk] = ()
    preempted_ids: Sequence[str] = ()
    predicted_s: float | None = None  # the latency model's forecast of the step time
    # the engine may stop this step between layers for arriving online work (its offline
    # tokens are then not committed)
    preemptible: bool = False
    shape: BatchShape | None = None
    # planned under the online TPOT budget (conserve, online work present)
    online_budget: bool = False
    # the latency model's forecast of the step's online work alone (conserve, online work)
    online_predicted_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclass
class StepResult:
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    elapsed_s: float = 0.0


class StopFlag:
    """A running step's stop request: set from another thread, read at every safepoint (by
    calling it), and by the compiled decode layers through `flag`, a C int, between layers."""

    __slots__ = ("flag",)

    def __init__(self) -> None:
        self.flag = ctypes.c_int(0)

    def set(self) -> None:
        self.flag.value = 1

    def __call__(self) -> bool:
        return self.flag.value != 0


class IterationPreempted(Exception):
    """A step was stopped at a safepoint after `layer` layers; it produced nothing yet.

    `continuation`, when the runner gives one, holds what the finished layers computed: the
    runner's `resume(continuation)` runs the remaining layers later (the step's requests must
    keep their KV blocks, unchanged, until then). Without it the step's work is lost."""

    def __init__(self, layer: int, continuation: object | None = None) -> None:
        super().__init__(f"step preempted before layer {layer}")
        self.layer = layer
        self.continuation = continuation
