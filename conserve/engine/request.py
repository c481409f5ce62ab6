"""One request type for online and offline work, and its legal state transitions.

A request's progress is two counters: `num_computed_tokens` (tokens whose KV is in the cache)
catches up with `num_tokens` (prompt plus generated). There is no separate prefill or decode
phase: a step computes some of the missing tokens, and when it reaches the last one it samples
the next token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from conserve.sampling.params import SamplingParams


class RequestClass(enum.Enum):
    ONLINE = "online"  # latency-critical
    OFFLINE = "offline"  # latency-tolerant: batch jobs, service_tier "flex"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, KV released
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
}
_TRANSITIONS: dict[RequestStatus, set[RequestStatus]] = {
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED},
    RequestStatus.PREEMPTED: {RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED},
    RequestStatus.RUNNING: {RequestStatus.PREEMPTED} | _FINISHED,
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    request_class: RequestClass = RequestClass.ONLINE
    arrival_time: float = field(default_factory=time.monotonic)
    # seed for this request's sampling stream (the user's seed, offset per n-index)
    seed: int | None = None
    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache on first admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    num_computed_before_preemption: int = 0
    queue_key: int = 0  # order in the waiting queues (preempted requests get smaller keys)
    # steps in which a younger, shorter prompt was started while this one waited (policies
    # that start online prompts shortest first: `Policy.online_prompt_tokens`)
    passed_over: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def move_to(self, new: RequestStatus) -> None:
        """The one place where status changes; illegal moves are bugs and raise."""
        if new not in _TRANSITIONS.get(self.status, set()):
            raise IllegalTransition(f"{self.request_id}: {self.status.value} -> {new.value}")
        self.status = new
