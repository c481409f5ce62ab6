"""What the engine lets others observe: a snapshot of its state (`Engine.stats()`) and a hook
called around every step (`Engine.add_observer`). The server's metrics, the step log and the
benchmarks read the engine only through these, never through its internals."""

from __future__ import annotations

from dataclasses import dataclass, field

from conserve.engine.batch import ScheduledBatch


@dataclass(frozen=True)
class KVStats:
    num_blocks: int
    block_size: int
    free_blocks: int  # blocks that can be handed out now (free, or cached and evictable)
    usage: float  # referenced blocks / all blocks
    request_tables: int  # requests holding blocks
    prefix_queries: int  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_hits: int  # of which found there


@dataclass(frozen=True)
class HostTierStats:
    """The host-tier checkpoint store (cumulative counters)."""

    num_blocks: int
    free_blocks: int
    blocks_checkpointed: int
    blocks_restored: int
    num_checkpoints: int  # gathered copies to the host tier
    num_restores: int  # copies back to the device
    checkpoint_s: float  # seconds spent copying out
    restore_s: float  # seconds spent copying back


@dataclass(frozen=True)
class HarvestStats:
    """What offline work got beside online work (cumulative; `attainment.HarvestCounter`)."""

    online_busy_s: float = 0.0  # seconds of steps that carried online work
    offline_only_busy_s: float = 0.0  # seconds of steps with offline work only
    offline_only_tokens: int = 0  # tokens those steps computed
    offline_computed_tokens: int = 0  # every offline token computed, in any step


@dataclass(frozen=True)
class EngineStats:
    """A snapshot; counters are cumulative since the engine started."""

    num_steps: int  # steps that ran to the end
    busy_s: float  # seconds those steps computed
    running: int
    waiting: int
    by_class: dict[str, tuple[int, int]]  # request class -> (running, waiting) sequences
    kv: KVStats
    host: HostTierStats | None  # None when the policy keeps no host tier
    num_preemptions: int  # recompute/pause preemptions (for blocks or seats)
    preemptions_by_class: dict[str, int]
    num_layer_preemptions: int  # steps stopped between layers for arriving online work
    num_layer_resumes: int  # stopped steps resumed later from the layer where they stopped
    num_layer_drops: int  # stopped offline steps dropped before their resume (work lost)
    num_pauses: int  # offline preemptions resumed from the host tier
    tokens_recomputed: int  # computed before a preemption, computed again after it
    tokens_restored: int  # copied back from the host tier instead
    shared_prefix_waits: int  # admissions put off to share a prefix being computed
    # requests aborted before they finished, per class (every class, 0 included)
    aborted_by_class: dict[str, int] = field(default_factory=dict)
    # online objectives met / missed: "ttft" / "tpot" -> (met, missed) (`attainment`)
    objectives: dict[str, tuple[int, int]] = field(default_factory=dict)
    harvest: HarvestStats = field(default_factory=HarvestStats)

    def preemptions_by_kind(self) -> dict[str, int]:
        """`recompute_<class>` per class and `layer`: the server's metric labels."""
        kinds = {f"recompute_{c}": n for c, n in self.preemptions_by_class.items()}
        kinds["layer"] = self.num_layer_preemptions
        return kinds


@dataclass(frozen=True)
class StepRecord:
    """One step as observers see it once it ended (ran to the end, or stopped at a layer)."""

    batch: ScheduledBatch
    started: float  # time.monotonic() when the step started computing
    plan_s: float  # planning before it
    run_s: float  # computing (to the stop, for a stopped step)
    apply_s: float  # applying the results (0 for a stopped step)
    stopped_at_layer: int | None = None  # layers run before a stop; None: ran to the end
    stop_wait_s: float | None = None  # for a stopped step: seconds from the stop request
    prediction_scale: float = 1.0  # the policy's correction of predictions, when planned
    # a resumed step: the layer it resumed from (it ran only the layers after it, so its
    # time is not the batch's predicted time)
    resumed_from_layer: int | None = None
    kept: bool = False  # a stopped step kept to be resumed (its finished layers not lost)

    @property
    def stopped(self) -> bool:
        return self.stopped_at_layer is not None


class StepObserver:
    """Called by the engine loop's thread: keep it cheap. Override what you need."""

    def on_request_added(
        self, request_id: str, request_class: str, prompt_len: int, arrived: float
    ) -> None:
        """A request (all its sequences) entered the engine; `arrived`: when it reached the
        engine's process (`time.monotonic()`), which may be earlier when it waited for a
        running step to stop."""

    def on_request_received(self, request_id: str, received: float | None, sent: float) -> None:
        """Called just before `on_request_added` for a request that came through the API
        process: `received` is when the HTTP server got it (None if unknown), `sent` when the
        API process passed it on (both `time.monotonic()`, one clock for the machine)."""

    def on_step_start(self, batch: ScheduledBatch) -> None:
        """A planned step is about to compute."""

    def on_step_end(self, record: StepRecord) -> None:
        """A step ended; for a stopped step nothing of it was committed (yet: a kept one is
        resumed later, and ends again then)."""
