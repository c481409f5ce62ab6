"""Scheduling policies: how online and offline requests share the steps.

The scheduler (`scheduler.py`) owns the mechanism: queues, block reservations, chunks,
preemption, checkpoints. A policy object answers the questions it asks on the way:

- queue order: one arrival-ordered queue across classes, or online requests first
  (`online_first`);
- whether offline work may run in this step at all (`runs_offline`);
- the time budget for the step's offline tokens (`offline_budget`), and whether a step that
  carries offline work may be stopped between layers (`preemptible`);
- which running requests may be preempted for another, for blocks or for a seat (`victims`);
- what the engine must build for it (`uses_latency_model`, `uses_host_tier`).

One class per `--policy` name (`POLICY_CLASSES`; `conserve.config.POLICIES` lists the same
names for config validation): `OnlineOnlyPolicy`, `FcfsPolicy`, `PriorityPolicy` and
`ConservePolicy`, which also keeps the state of its latency budget (the SLOs, how far recent
steps overran their prediction, when online work was last seen). Policies are plain objects:
the current time is passed in, so a fake latency model and made-up times test them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from conserve.config import SchedulerConfig
from conserve.engine.batch import ScheduledBatch
from conserve.engine.latency import BatchShape, LatencyModel
from conserve.engine.request import Request, RequestClass, RequestStatus

ONLINE, OFFLINE = RequestClass.ONLINE, RequestClass.OFFLINE
# conserve: offline steps are kept short (`offline_step_limit`) only while online requests
# have been seen this recently (seconds); a server running batch work alone gets full steps
ONLINE_RECENT_S = 60.0
# conserve: measured / predicted time of this many recent budgeted steps is kept, and the
# budget is corrected once there are at least BUDGET_MIN_STEPS of them
BUDGET_WINDOW = 64
BUDGET_MIN_STEPS = 8
MAX_PREDICTION_SCALE = 2.0
# conserve: offline steps while online work is recent are cut to this many one-token steps.
# Measured in `bench coserve` (users x prefill-heavy, benchmarks/results/offline-step-sizes-*):
# with 20 (about 240 ms), offline steps of 512-768 tokens computed 68% and those of 768-1024
# tokens 83% of the tokens per second of the full 2048-token steps of the job alone (prompts
# cut into more chunks that attend to cached context, smaller matmuls), and offline work got
# 73% of its ceiling. An arrival waits for the running part of a step it stops (one chunk's
# attention or one half of a layer), not for the step, so longer steps cost it little.
# Tried at 100 (coserve-20261204-2321, -20261205-0006, with the compiled prefill and decode
# attention): offline-only steps of ~1220 tokens instead of ~740 ran at 96% of the job's alone
# speed instead of 90% (users x mixed: 89% of the ceiling against 85%), but an arrival waited
# longer for the running half-layer (median 2.9 -> 6.5 ms beside the mixed job, 4.9 ms beside
# the prefill-heavy one), and the trace's short prompts, 55 ms alone, took 1.23x at P50 beside
# the prefill-heavy job. With the feed-forward half in row slices (runner.py), A/B in one
# session at 50 (about 0.34 s here, coserve-20261205-0500) and at 1.0 s (coserve-20261205-0527,
# `--offline-step-s 1.0`), paced users and the trace beside the prefill-heavy and mixed jobs:
# offline work got 94 / 93 / 98 / 97% of the ceiling at 1.0 s against 91 / 88 / 97 / 87% at
# 50, every online figure within 1.09x alone at 1.0 s (1.14x at 50), the stop wait 1.8-2.1 ms
# median (max 8.5-10 ms) against 0.9-1.3 (max 3.8-5.2).
OFFLINE_STEP_MULTIPLE = 150
# conserve: while online work is recent, offline requests leave this share of the seats
# (`max_num_seqs`) free, so that an online arrival takes a free seat instead of preempting an
# offline request (measured: 256 offline clients filled every seat, and each online arrival
# preempted one, which also broke the stopped step it belonged to)
ONLINE_SEAT_SHARE = 1 / 16
# conserve, relative objectives: the slack that a step with online decodes leaves unused is
# banked (in predicted seconds) and spent on offline prompt chunks beside later online decodes,
# so that a continuous online stream does not starve every offline prompt (`bench coserve
# --online-modes stream`, benchmarks/results/coserve-20261202-1851.md). The bank holds at most
# BANK_STEPS steps' slack, and a step spends no more than the slack that the youngest running
# online request has earned (its output tokens so far, up to BANK_STEPS).
BANK_STEPS = 32
# a prompt chunk paid from the bank has at least this many tokens (or the rest of its prompt)
BANK_MIN_PROMPT_TOKENS = 16


# conserve: online prompts start shortest first, and a step takes a second online prompt chunk
# only while the step's online prompt tokens stay within ONLINE_PROMPT_TOKENS. On a CPU a
# prompt chunk of more than a few dozen tokens is bound by the matmuls' FLOPs, so two prompts in
# one step finish together, each as late as both alone: measured in `bench coserve` (users x
# decode-heavy, benchmarks/results/coserve-20261204-1726.md), two 509-token prompts that
# arrived 40 ms apart both got their first token after 1.2 s, twice their alone TTFT (in the
# online-alone run they had arrived 0.55 s apart). One after the other, the first gets its
# alone TTFT and the second waits for it; a short prompt no longer waits for a long one.
ONLINE_PROMPT_TOKENS = 64
# a waiting online prompt passed over by younger, shorter ones in this many steps goes first
ONLINE_PROMPT_PASSES = 4


@dataclass(frozen=True)
class Slo:
    """Online latency objectives.

    `ttft` and `tpot` are absolute targets in seconds; None (the default) makes that objective
    relative, "as if alone": a request's TTFT may exceed its own predicted alone prefill by
    `slack`, and a step carrying online work may take `slack` more than its online part alone.
    `margin` is the fraction of an absolute TPOT target that offline work leaves free (a
    margin for prediction error)."""

    tpot: float | None = None
    ttft: float | None = None
    margin: float = 0.1
    slack: float = 0.05

    @property
    def tpot_budget(self) -> float | None:
        """Predicted seconds a step with online decodes may take (absolute TPOT only)."""
        return None if self.tpot is None else self.tpot * (1 - self.margin)

    @staticmethod
    def from_config(config: SchedulerConfig) -> Slo:
        return Slo(config.tpot_slo, config.ttft_slo, config.slo_margin, config.slo_slack)

    def describe(self) -> str:
        """For logs and banners, e.g. "TTFT 0.5 s, TPOT as if alone +10%"."""
        parts = []
        for name, value in (("TTFT", self.ttft), ("TPOT", self.tpot)):
            parts.append(
                f"{name} {value:g} s" if value else f"{name} as if alone +{self.slack:.0%}"
            )
        return ", ".join(parts)


@dataclass(frozen=True)
class OfflineBudget:
    """What a step may add in offline work once online work is planned.

    `time_limit`: predicted seconds the whole step may take with its offline chunks (a prompt
    chunk is cut to fit; None: no limit). `online_budget`: that limit is the online TPOT
    budget (the engine reports such steps back to the policy). `decodes_only`: no offline
    prompt tokens at all. `decodes_first`: every offline decode runs first, uncut; then prompt
    chunks fill the step up to `prompt_limit(predicted time of the decodes)`."""

    time_limit: float | None = None
    online_budget: bool = False
    decodes_only: bool = False
    decodes_first: bool = False
    min_prompt_s: float = 0.0  # with decodes_first: prompt chunks get at least this on top
    min_prompt_tokens: int = 1  # a prompt chunk cut to fit is at least this long, or not run

    def prompt_limit(self, decodes_s: float) -> float | None:
        """The time limit for prompt chunks after decodes that take `decodes_s` seconds."""
        if self.time_limit is None:
            return None
        return max(self.time_limit, decodes_s + self.min_prompt_s)


NO_LIMIT = OfflineBudget()


class Policy:
    """The base policy: online requests first (running, then waiting), then offline ones with
    what is left of the token budget, no time limit, steps never stopped. An online request
    that needs a seat or blocks preempts the newest offline request (recomputed or restored
    later): priority scheduling at iteration granularity."""

    name: ClassVar[str] = ""
    online_first: ClassVar[bool] = True  # False: one queue in arrival order, whatever the class
    uses_latency_model: ClassVar[bool] = False  # the engine loads one (and resolves SLOs)
    uses_host_tier: ClassVar[bool] = False  # the engine keeps checkpoints of offline KV
    # None: online prompts start in queue order, as many per step as the token budget takes.
    # An int: waiting online prompts start shortest first (one passed over in
    # ONLINE_PROMPT_PASSES steps goes first), and a step takes an online prompt chunk beyond
    # its first only while its online prompt tokens stay within this many
    online_prompt_tokens: ClassVar[int | None] = None
    slo: Slo | None = None  # the SLOs the policy plans with
    prediction_scale: float = 1.0  # correction the policy applies to predicted step times

    def __init__(self, latency: LatencyModel | None = None) -> None:
        # predicts step times (ScheduledBatch.predicted_s; time limits, where the policy sets
        # them); the engine refits it in place while serving
        self.latency = latency

    @classmethod
    def build(
        cls,
        latency: LatencyModel | None = None,
        slo: Slo | None = None,
        offline_step_s: float | None = None,
    ) -> Policy:
        """A policy of this class from the engine's settings (those it has no use for are
        ignored)."""
        return cls(latency)

    def note_online(self, now: float) -> None:
        """Online work exists at `now` (a request was added, or a plan found some)."""

    def runs_offline(self, online_present: bool) -> bool:
        """Whether offline requests may compute in this step."""
        return True

    def offline_budget(
        self,
        running: Sequence[Request],
        online_present: bool,
        online_prefill: bool,
        now: float,
        online: BatchShape | None = None,
    ) -> OfflineBudget:
        """The limits on this step's offline work. `running`: the running requests;
        `online_prefill`: the step already carries an online chunk of more than one token;
        `online`: the shape of the online work planned for this step."""
        return NO_LIMIT

    def offline_seats(self, max_num_seqs: int, now: float) -> int:
        """How many requests may be running when an offline request is admitted."""
        return max_num_seqs

    def preemptible(self, num_offline: int) -> bool:
        """Whether a step with `num_offline` offline chunks may be stopped between layers."""
        return False

    def victims(self, request: Request, candidates: Sequence[Request]) -> list[Request]:
        """Running requests that may be preempted so that `request` gets blocks or a seat,
        best victim first. `candidates`: the running requests not scheduled yet in this step,
        oldest first (a running `request` is among them: it may have to preempt itself).

        A waiting request preempts only when it is online, and only offline requests; a running
        request preempts the newest offline ones first, then (if it is online) the newest
        online ones."""
        offline = [r for r in reversed(candidates) if r.request_class is OFFLINE]
        if request.status is not RequestStatus.RUNNING:
            return offline if request.request_class is ONLINE else []
        if request.request_class is OFFLINE:
            return offline
        return offline + [r for r in reversed(candidates) if r.request_class is ONLINE]

    def observe_step(self, batch: ScheduledBatch, seconds: float) -> None:
        """`batch`, planned by this policy, ran to its end in `seconds`."""


class FcfsPolicy(Policy):
    """`fcfs`: one queue, no classes. Running requests first, oldest first (their next decode
    token or prefill chunk), then waiting requests in arrival order while the token budget,
    the seats and the blocks last. A running request that needs a block preempts the newest
    running request not scheduled yet (possibly itself); a waiting one waits."""

    name = "fcfs"
    online_first = False

    def victims(self, request: Request, candidates: Sequence[Request]) -> list[Request]:
        if request.status is not RequestStatus.RUNNING:
            return []
        return list(reversed(candidates))


class PriorityPolicy(Policy):
    """`priority`: the base policy (online first, offline with the rest of the token budget;
    online requests preempt the newest offline one for a seat or blocks)."""

    name = "priority"


class OnlineOnlyPolicy(Policy):
    """`online-only`: while any online request is running or waiting, offline requests get
    nothing (those running keep their blocks); then they run as under `priority`."""

    name = "online-only"

    def runs_offline(self, online_present: bool) -> bool:
        return not online_present


class ConservePolicy(Policy):
    """`conserve`: as `priority`, but offline work is sized by the latency model.

    While online work exists, offline decodes and prefill chunks are added only while the
    predicted step time stays inside a budget. By default (no absolute TPOT objective) that is
    "as if alone" (`relative_budget`): the predicted time of the step's online work alone plus
    the slack, divided by `prediction_scale` (here: how much more recent steps with offline work
    overran their prediction than steps without it). With an absolute TPOT objective it is
    `tpot_budget`: the SLO minus the margin, less for a running online request that is behind
    it (its tokens so far took longer than that on average, e.g. while another request's prompt
    was computed, so the steps after give the time back), divided by `prediction_scale` (how
    much recent budgeted steps overran their prediction). A step that carries an online prefill
    chunk takes offline decodes only, so a new online request's first token does not wait for
    offline prompt tokens. With relative objectives a step with online decodes takes offline
    prompt chunks only from the `bank` of slack that earlier steps left unused.

    Online prompts start shortest first, one per step unless they are short
    (ONLINE_PROMPT_TOKENS), so that a prompt does not wait for another one computed beside it.

    With no online work, offline work gets the token budget; while online requests have been
    seen in the last ONLINE_RECENT_S seconds, every offline decode runs and prompt chunks are
    cut to a predicted step time (`offline_step_limit`) that is efficient but not so long that
    a stop throws much away. A step with offline work may be stopped between layers when an
    online request arrives. Offline requests' KV is checkpointed to the host tier."""

    name = "conserve"
    uses_latency_model = True
    uses_host_tier = True
    online_prompt_tokens = ONLINE_PROMPT_TOKENS

    def __init__(
        self,
        latency: LatencyModel | None = None,
        slo: Slo | None = None,
        offline_step_s: float | None = None,
    ) -> None:
        super().__init__(latency)
        self.slo = slo
        self.offline_step_s = offline_step_s  # configured step limit (None: from the model)
        self._derived_step_s: float | None = None  # derived from the latency model once
        self._last_online = float("-inf")  # when online work was last seen
        # measured / predicted time of recent steps planned under the online TPOT budget
        # (with offline work in them or not: a budget too small for any offline work must
        # still hear that steps are on time again): the budget is divided by a high quantile
        # of it, so a model that under-predicts the shapes co-serving produces (many offline
        # decodes beside online ones) is corrected
        self._budget_errors: deque[float] = deque(maxlen=BUDGET_WINDOW)
        # relative objectives: measured / predicted time of recent budgeted steps with offline
        # work and of those without; the budget is divided by the ratio of their medians, so
        # that offline work adds no more than the slack to what the online work alone takes
        # even where the model errs on mixed shapes only
        self._mixed_errors: deque[float] = deque(maxlen=BUDGET_WINDOW)
        self._online_errors: deque[float] = deque(maxlen=BUDGET_WINDOW)
        self.prediction_scale = 1.0
        # relative objectives: predicted seconds of slack left unused by recent steps with
        # online decodes (BANK_STEPS)
        self.bank = 0.0

    @property
    def relative(self) -> bool:
        """The TPOT objective is "as if alone" (no absolute `--tpot-slo`)."""
        return self.slo is not None and self.slo.tpot is None

    @classmethod
    def build(
        cls,
        latency: LatencyModel | None = None,
        slo: Slo | None = None,
        offline_step_s: float | None = None,
    ) -> ConservePolicy:
        return cls(latency, slo, offline_step_s)

    def note_online(self, now: float) -> None:
        self._last_online = now

    def relative_budget(self, online: BatchShape) -> float | None:
        """Predicted seconds a step with `online` work may take with offline work added: the
        online work alone plus the slack, corrected by `prediction_scale`."""
        if self.slo is None or self.latency is None:
            return None
        alone = self.latency.predict(online)
        return alone * (1 + self.slo.slack) / self.prediction_scale

    def tpot_budget(self, running: Sequence[Request], now: float) -> float | None:
        """Predicted seconds an offline-carrying step may take while online work exists: the
        TPOT SLO minus the margin, less for an online request that is behind it."""
        if self.slo is None or self.latency is None or self.slo.tpot_budget is None:
            return None
        base = self.slo.tpot_budget
        budget = base
        for r in running:
            if r.request_class is ONLINE and r.first_token_time is not None:
                # After this step the request's TPOT is (now + step - first) / k, with k
                # tokens after its first: keep that inside the budget. A request that lost
                # time (to another request's prompt, say) gets it back from offline work.
                k = r.num_output_tokens
                budget = min(budget, base * k - (now - r.first_token_time))
        return max(budget, 0.0) / self.prediction_scale

    @property
    def offline_step_limit(self) -> float | None:
        """Predicted seconds of a step with no online work: its offline prompt chunks are cut
        to fit (its decodes are not; prompt chunks then get a quarter of it on top of them).
        OFFLINE_STEP_MULTIPLE one-token steps: long enough that offline work runs nearly as
        fast as in full steps, while an arriving online request waits only for the running
        part of a step it stops (a stopped step keeps its work, and resumes)."""
        if self.offline_step_s is not None:
            return self.offline_step_s
        if self.latency is None:
            return None
        if self._derived_step_s is None:
            one = self.latency.predict(BatchShape().with_chunk(0, 1))
            self._derived_step_s = OFFLINE_STEP_MULTIPLE * one
        return self._derived_step_s

    def short_offline_steps(self, now: float) -> bool:
        """Online requests were seen in the last ONLINE_RECENT_S seconds (more may come, and
        a step they stop loses its work), and there is a step limit to apply."""
        recent = now - self._last_online <= ONLINE_RECENT_S
        return recent and self.offline_step_limit is not None

    def offline_budget(
        self,
        running: Sequence[Request],
        online_present: bool,
        online_prefill: bool,
        now: float,
        online: BatchShape | None = None,
    ) -> OfflineBudget:
        planned = online is not None and online.tokens > 0
        if online_present and self.relative and planned:
            if online_prefill:
                # the step computes an online prompt: its TTFT gets no offline work beside it
                # (the slack of its TTFT is spent waiting for a stopped step's safepoint)
                return OfflineBudget(0.0, online_budget=True, decodes_only=True)
            return self.relative_decode_budget(running, online)
        if online_present and not self.relative:
            budget = self.tpot_budget(running, now)
            return OfflineBudget(budget, online_budget=True, decodes_only=online_prefill)
        # (relative objectives, online work waiting but none planned in this step: the step is
        # an offline one, which an arrival may stop)
        if self.short_offline_steps(now):
            # no online work: every decode, then prompt chunks up to the step limit (and at
            # least a quarter of it, so that new requests keep starting)
            limit = self.offline_step_limit
            return OfflineBudget(limit, decodes_first=True, min_prompt_s=limit / 4)
        return NO_LIMIT

    def relative_decode_budget(
        self, running: Sequence[Request], online: BatchShape
    ) -> OfflineBudget:
        """The offline budget of a step with online decodes (relative objectives): offline
        decodes within the slack; prompt chunks only from the bank, and at least
        BANK_MIN_PROMPT_TOKENS long. A small prompt chunk cut to fit one step's slack costs far
        more than its tokens (measured: 8 prompt tokens at a long context added 13.7 ms to a 63
        ms online decode step, predicted 3.3 ms: the per-chunk work of gathering its context in
        every layer), while decodes are batched and predicted well."""
        budget = self.relative_budget(online)
        spendable = min(self.bank, self.bank_cap(running, online)) if self.bank > 0 else 0.0
        if spendable <= 0:
            return OfflineBudget(budget, online_budget=True, decodes_only=True)
        return OfflineBudget(
            budget + spendable, online_budget=True, min_prompt_tokens=BANK_MIN_PROMPT_TOKENS
        )

    def bank_cap(self, running: Sequence[Request], online: BatchShape) -> float:
        """The most a step with `online` work may spend from the bank: the slack of as many
        steps as the youngest running online request has output tokens (at most BANK_STEPS),
        so that no request pays for more slack than its own tokens earned."""
        if self.slo is None or self.latency is None:
            return 0.0
        outputs = [r.num_output_tokens for r in running if r.request_class is ONLINE]
        steps = min([BANK_STEPS, *outputs])
        return steps * self.slo.slack * self.latency.predict(online)

    def update_bank(self, batch: ScheduledBatch) -> None:
        """A step planned with online decodes under relative objectives ran: bank the budget
        it left unused, or take what it spent beyond the budget (between 0 and BANK_STEPS
        steps' slack)."""
        if self.slo is None or batch.online_predicted_s is None or batch.predicted_s is None:
            return
        if any(c.num_tokens > 1 and not c.offline for c in batch.chunks):
            return  # an online prefill step: no offline work, nothing banked
        alone = batch.online_predicted_s
        budget = max(alone, alone * (1 + self.slo.slack) / self.prediction_scale)
        cap = BANK_STEPS * self.slo.slack * alone
        self.bank = min(cap, max(0.0, self.bank + budget - batch.predicted_s))

    def offline_seats(self, max_num_seqs: int, now: float) -> int:
        """While online work is recent, ONLINE_SEAT_SHARE of the seats (at least one) are
        kept for online arrivals; a server running batch work alone gets every seat."""
        if now - self._last_online > ONLINE_RECENT_S or max_num_seqs < 2:
            return max_num_seqs
        return max_num_seqs - max(1, round(max_num_seqs * ONLINE_SEAT_SHARE))

    def preemptible(self, num_offline: int) -> bool:
        return num_offline > 0

    def observe_step(self, batch: ScheduledBatch, seconds: float) -> None:
        if not batch.online_budget or batch.predicted_s is None:
            return
        if self.relative:
            mixed = any(c.offline for c in batch.chunks)
            self.observe_relative(batch.predicted_s, seconds, mixed)
            self.update_bank(batch)
        else:
            self.observe_budgeted(batch.predicted_s, seconds)

    def observe_relative(self, predicted: float, measured: float, mixed: bool) -> None:
        """A step with online work took `measured` seconds against the `predicted`; `mixed`:
        it carried offline work. `prediction_scale` becomes the median of measured / predicted
        of the last BUDGET_WINDOW mixed steps over that of the steps without offline work (1
        for either side with fewer than BUDGET_MIN_STEPS), within [1, MAX_PREDICTION_SCALE]:
        mixed steps that seem faster than predicted never enlarge the budget (measured in
        serving, that ratio came from the few online-only steps, mostly prefills, and let
        offline work take 1.5x the online step)."""
        if predicted <= 0:
            return
        (self._mixed_errors if mixed else self._online_errors).append(measured / predicted)
        if len(self._mixed_errors) < BUDGET_MIN_STEPS:
            return
        ratio = _median(self._mixed_errors)
        if len(self._online_errors) >= BUDGET_MIN_STEPS:
            ratio /= _median(self._online_errors)
        self.prediction_scale = min(MAX_PREDICTION_SCALE, max(1.0, ratio))

    def observe_budgeted(self, predicted: float, measured: float) -> None:
        """A step planned under the online TPOT budget took `measured` seconds against the
        `predicted`: update `prediction_scale` (the 90th percentile of measured / predicted
        over the last BUDGET_WINDOW such steps, between 1 and MAX_PREDICTION_SCALE; 1 until
        there are BUDGET_MIN_STEPS)."""
        if predicted <= 0:
            return
        self._budget_errors.append(measured / predicted)
        if len(self._budget_errors) < BUDGET_MIN_STEPS:
            return
        ranked = sorted(self._budget_errors)
        p90 = ranked[int(0.9 * (len(ranked) - 1))]
        self.prediction_scale = min(MAX_PREDICTION_SCALE, max(1.0, p90))


def _median(values: Sequence[float]) -> float:
    ranked = sorted(values)
    mid = len(ranked) // 2
    return ranked[mid] if len(ranked) % 2 else (ranked[mid - 1] + ranked[mid]) / 2


POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (OnlineOnlyPolicy, FcfsPolicy, PriorityPolicy, ConservePolicy)
}


def policy_class(name: str) -> type[Policy]:
    """The class of the policy called `name` (`--policy`)."""
    try:
        return POLICY_CLASSES[name]
    except KeyError:
        names = ", ".join(POLICY_CLASSES)
        raise ValueError(f"policy must be one of {names}, not {name!r}") from None


def make_policy(
    name: str,
    latency: LatencyModel | None = None,
    slo: Slo | None = None,
    offline_step_s: float | None = None,
) -> Policy:
    """A new policy object: `latency` predicts step times, `slo` are the online targets and
    `offline_step_s` the configured offline step limit (conserve; None: derived from the
    latency model)."""
    return policy_class(name).build(latency, slo, offline_step_s)
