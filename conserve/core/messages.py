"""Messages between the API process and the engine core process (pickled over a pipe): requests
and aborts one way; readiness, per-step output deltas, rejections and statistics the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conserve.engine.request import RequestClass
from conserve.model.config import ModelConfig
from conserve.sampling.params import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    request_class: RequestClass
    stream: bool
    # time.monotonic() (one clock for every process of the machine) when the HTTP server
    # received the request and when this message left the API process; None when unknown.
    # The step log records both, so the API process's share of a TTFT can be told apart.
    received: float | None = None
    sent: float | None = None


@dataclass(frozen=True)
class Abort:
    request_ids: list[str]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Door:
    """The HTTP server has received requests it has not classified yet (`open`), or has none
    left. Any of them may be online, so an open door stops a running offline step as an online
    arrival does (`Engine.door`): the API process then reads, validates and tokenizes it on
    cores the engine is not using."""

    open: bool


@dataclass
class SeqDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Any] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class RequestDelta:
    """What changed for one request in one step."""

    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int


@dataclass
class Ready:
    model_name: str
    max_model_len: int
    num_kv_blocks: int
    policy: str
    tpot_slo: float | None
    ttft_slo: float | None
    # the model's shape and where it runs: the batch planner's cost model reads them
    model_config: ModelConfig | None = None
    dtype: str = "float32"
    device: str = "cpu"
    # relative ("as if alone") objectives: the slack; None when the policy has no objectives
    slo_slack: float | None = None
    # the latency profile the engine plans with (JSON text; None without one): a restarted
    # core reuses it instead of measuring again
    latency_profile: str | None = None


@dataclass
class Failed:
    message: str


@dataclass
class Rejected:
    """The core refused a request (the API process validates first, so this is rare)."""

    request_id: str
    message: str


@dataclass
class Stats:
    running: int
    waiting: int
    kv_usage: float
    kv_tables: int
    by_class: dict[str, tuple[int, int]]  # class -> (running, waiting)
    num_preemptions: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int
    step_times: list[float]  # since the previous Stats
    integrity_error: str | None
    # preemptions by kind ("recompute" per class, "layer"), cumulative
    preemptions_by_kind: dict[str, int] = field(default_factory=dict)
    # since the previous Stats: (seconds from stop request to stopped step, layers run)
    layer_preemptions: list[tuple[float, int]] = field(default_factory=list)
    step_predictions: list[tuple[float, float]] = field(default_factory=list)  # (pred, real)
    # host-tier checkpoints and what resumes cost, cumulative
    kv_tiers: dict[str, int] = field(default_factory=dict)
    # times a waiting request was passed over for prompt blocks another one was computing
    shared_prefix_waits: int = 0
    # requests aborted before they finished, per class, cumulative
    aborted_by_class: dict[str, int] = field(default_factory=dict)
    # online sequences whose objectives were met / missed: "ttft" / "tpot" -> (met, missed)
    online_objectives: dict[str, tuple[int, int]] = field(default_factory=dict)
    # seconds of steps with online work; seconds and tokens of steps with offline work only;
    # every offline token computed (cumulative: the dashboard's harvest ceiling)
    online_busy_s: float = 0.0
    offline_only_busy_s: float = 0.0
    offline_only_tokens: int = 0
    offline_computed_tokens: int = 0
    host_kv_usage: float = 0.0  # host-tier blocks in use (0-1; 0 without a host tier)
    engines: int = 1  # engines these figures add up (replicas that answered)
