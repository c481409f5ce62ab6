"""What co-serving achieved, counted by the engine as it runs (observation only: nothing here
changes a plan).

`ObjectiveCounter`: for each online sequence, whether its TTFT objective was met when its first
token is produced, and its TPOT objective when it finishes (with at least two tokens).

- Absolute objectives (`--ttft-slo`, `--tpot-slo`): TTFT = first token - arrival at the engine's
  process; TPOT = (last token - first token) / (tokens - 1).
- Relative ones ("as if alone" + slack): what offline work added is compared with the slack.
  Alone, the request would still wait for the online work ahead of it and its own prefill;
  offline work adds the time of steps without online work (and of stopped steps) that ran while
  it waited, and its share of steps that carried both, estimated from the step's predicted
  time and the predicted time of its online work alone. TTFT is met when that added time is at
  most `slack` x its own predicted prefill alone (the rule the preemption monitor stops steps
  by); TPOT when it is at most `slack` x the rest of the time between its first and last token
  (its decode time alone).

`HarvestCounter` (a step observer): seconds of steps that carried online work, seconds and
tokens of steps with offline work only, and every offline token computed. Offline work can use
at most the time online work leaves, at the rate it gets alone: the server's dashboard turns
these into the harvest ceiling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from conserve.engine.batch import ScheduledBatch
from conserve.engine.policy import Slo
from conserve.engine.request import Request
from conserve.engine.stats import HarvestStats, StepObserver, StepRecord

OBJECTIVES = ("ttft", "tpot")


def offline_share(batch: ScheduledBatch, stopped: bool = False) -> float:
    """The fraction of a step's time that offline work took from online work: all of a step
    without online chunks or one that was stopped (an online arrival waited for it), none of a
    step without offline chunks, and for a mixed step 1 - predicted online alone / predicted
    (by tokens when there is no prediction)."""
    online = sum(c.num_tokens for c in batch.chunks if not c.offline)
    offline = sum(c.num_tokens for c in batch.chunks if c.offline)
    if stopped or online == 0:
        return 1.0
    if offline == 0:
        return 0.0
    pred, alone = batch.predicted_s, batch.online_predicted_s
    if pred and alone is not None and pred > 0:
        return min(1.0, max(0.0, 1.0 - alone / pred))
    return offline / (online + offline)


@dataclass
class _Open:
    """An online sequence being watched: its current window (from arrival, then from its first
    token) and the seconds offline work added in it."""

    since: float
    own_s: float  # its predicted prefill alone
    offline_s: float = 0.0
    first_at: float | None = None


class ObjectiveCounter:
    """Met / missed counts of the online objectives (see the module doc)."""

    def __init__(self) -> None:
        self.met = dict.fromkeys(OBJECTIVES, 0)
        self.missed = dict.fromkeys(OBJECTIVES, 0)
        self._open: dict[str, _Open] = {}

    def counts(self) -> dict[str, tuple[int, int]]:
        """objective -> (met, missed), cumulative."""
        return {k: (self.met[k], self.missed[k]) for k in OBJECTIVES}

    def watch(self, request_id: str, arrived: float, own_prefill_s: float) -> None:
        """An online sequence arrived at `arrived`; alone, its prefill is predicted to take
        `own_prefill_s`."""
        self._open[request_id] = _Open(arrived, own_prefill_s)

    def forget(self, request_id: str) -> None:
        """An aborted sequence counts for neither objective."""
        self._open.pop(request_id, None)

    def on_step(
        self,
        batch: ScheduledBatch,
        started: float,
        ended: float,
        advanced: Iterable[Request],
        slo: Slo | None,
        stopped: bool = False,
    ) -> None:
        """A step ran from `started` to `ended` (planning to the end of applying it);
        `advanced`: the sequences that got a token in it (their status already updated)."""
        if not self._open:
            return
        share = offline_share(batch, stopped)
        if share > 0:
            for w in self._open.values():
                w.offline_s += share * max(0.0, ended - max(started, w.since))
        if slo is None:
            return
        for req in advanced:
            w = self._open.get(req.request_id)
            if w is None:
                continue
            if w.first_at is None:
                self._count("ttft", _ttft_met(w, ended, slo))
                w.first_at = w.since = ended
                w.offline_s = 0.0
            if req.is_finished:
                del self._open[req.request_id]
                if req.num_output_tokens > 1:
                    self._count("tpot", _tpot_met(w, ended, req.num_output_tokens, slo))

    def _count(self, objective: str, met: bool) -> None:
        (self.met if met else self.missed)[objective] += 1


def _ttft_met(w: _Open, now: float, slo: Slo) -> bool:
    if slo.ttft is not None:
        return now - w.since <= slo.ttft
    return w.offline_s <= slo.slack * w.own_s


def _tpot_met(w: _Open, now: float, tokens: int, slo: Slo) -> bool:
    assert w.first_at is not None
    decode_s = now - w.first_at
    if slo.tpot is not None:
        return decode_s / (tokens - 1) <= slo.tpot
    return w.offline_s <= slo.slack * max(0.0, decode_s - w.offline_s)


class HarvestCounter(StepObserver):
    """Busy seconds and offline tokens by the kind of step (see the module doc). A step's time
    is its planning, computing and applying; a stopped step counts its time (and no tokens:
    they count when a kept step resumes and ends)."""

    def __init__(self) -> None:
        self.online_busy_s = 0.0
        self.offline_only_busy_s = 0.0
        self.offline_only_tokens = 0
        self.offline_computed_tokens = 0

    def on_step_end(self, record: StepRecord) -> None:
        chunks = record.batch.chunks
        seconds = record.plan_s + record.run_s + record.apply_s
        offline = sum(c.num_tokens for c in chunks if c.offline)
        if any(not c.offline for c in chunks):
            self.online_busy_s += seconds
        elif chunks:
            self.offline_only_busy_s += seconds
            if not record.stopped:
                self.offline_only_tokens += offline
        if not record.stopped:
            self.offline_computed_tokens += offline

    def stats(self) -> HarvestStats:
        return HarvestStats(
            online_busy_s=self.online_busy_s,
            offline_only_busy_s=self.offline_only_busy_s,
            offline_only_tokens=self.offline_only_tokens,
            offline_computed_tokens=self.offline_computed_tokens,
        )
