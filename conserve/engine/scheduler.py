"""Continuous batching with chunked prefill, request classes and latency budgets.

`schedule()` decides which tokens run next and reserves their KV blocks; `update()` applies what
the runner computed. Requests join and leave between any two steps.

Policies (`SchedulerConfig.policy`):
- `fcfs`: one queue, no classes. Running requests first, oldest first (their next decode token
  or prefill chunk), then waiting requests in arrival order while the token budget, the seats
  and the blocks last.
- `online-only`: while any online request is running or waiting, offline requests get nothing
  (those running keep their blocks); then they run as in fcfs.
- `priority`: online requests first (running, then waiting), then offline ones with the rest of
  the token budget. An online request that needs a seat or blocks preempts the newest offline
  request, which is recomputed later: priority scheduling at iteration granularity.
- `conserve`: as `priority`, but while online work exists offline decodes and prefill chunks
  are added only while the *predicted* step time (the latency model) stays inside the TPOT
  budget: the SLO minus a margin, less for a running online request that is behind it (its
  tokens so far took longer than that on average, e.g. while another request's prompt was
  computed, so the steps after give the time back), and divided by `prediction_scale` (how
  much recent budgeted steps overran their prediction). A prefill chunk is cut to the size
  that fits. A step that carries an online prefill chunk takes offline decodes only, so a
  new online request's first token does not wait for offline prompt tokens. With no online
  work, offline work gets the token budget; while online requests have been seen in the last
  minute, its prompt chunks are cut to a predicted step time (`offline_step_limit`) that is
  efficient but not so long that a stop throws much away. A step with offline work is marked
  preemptible: the engine may stop it between layers when an online request arrives.

When a request needs a block and none is free, a running request not yet scheduled in this step
is preempted: the newest one (fcfs), the newest offline one first (other policies). Its blocks
are released (full blocks stay in the prefix cache) and it goes back to the front of its queue
to be recomputed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from conserve.config import SchedulerConfig
from conserve.engine.batch import ScheduledBatch, ScheduledChunk, StepResult
from conserve.engine.latency import BatchShape, LatencyModel
from conserve.engine.request import Request, RequestClass, RequestStatus
from conserve.kv.block_pool import BlockHash
from conserve.kv.host_tier import HostKVStore
from conserve.kv.manager import KVCacheManager, PrefixHit
from conserve.sampling.types import SampleSpec

ONLINE, OFFLINE = RequestClass.ONLINE, RequestClass.OFFLINE
# conserve: offline steps are kept short (`offline_step_limit`) only while online requests
# have been seen this recently (seconds); a server running batch work alone gets full steps
ONLINE_RECENT_S = 60.0


# A waiting request whose next prompt blocks (after its prefix-cache hit) are being computed
# by a running request waits until they are cached, instead of computing them a second time
# in parallel, when they are at least this many blocks
SHARED_PREFIX_MIN_BLOCKS = 4
# ... and a plan passes over at most this many (each costs a prefix lookup): the rest of the
# queue waits for the next step
MAX_PASSED_OVER = 16


def _first(queue: deque[Request], skip: set[str]) -> Request | None:
    return next((r for r in queue if r.request_id not in skip), None)


def _heads(queue: deque[Request], skip: set[str]) -> Iterable[Request]:
    """The first request of the queue not in `skip`, again after each time the consumer takes
    it or adds it to `skip`."""
    while (r := _first(queue, skip)) is not None:
        yield r


def _take(queue: deque[Request], request: Request) -> None:
    """Remove `request` (by identity) from `queue`; it is almost always the head."""
    if queue[0] is request:
        queue.popleft()
        return
    for i, r in enumerate(queue):
        if r is request:
            del queue[i]
            return
    raise ValueError(f"{request.request_id} is not in the queue")


@dataclass
class _Plan:
    budget: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    scheduled: set[str] = field(default_factory=set)
    preempted: list[str] = field(default_factory=list)
    shape: BatchShape = field(default_factory=BatchShape)
    time_limit: float | None = None  # seconds, for offline chunks
    online_budget: bool = False  # the time limit is the online TPOT budget
    # offline work limited to decodes: the step already carries an online prefill, whose
    # first token (TTFT) should not wait for offline prompt tokens
    offline_decodes_only: bool = False
    num_offline: int = 0


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        latency: LatencyModel | None = None,
        host: HostKVStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.clock = clock  # stamps first tokens; online requests' TPOT budgets read it
        self.kv = kv
        self.latency = latency
        self.host = host  # checkpoints of offline requests (conserve policy)
        self.queues: dict[RequestClass, deque[Request]] = {ONLINE: deque(), OFFLINE: deque()}
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.preemptions_by_class = {ONLINE: 0, OFFLINE: 0}
        self.num_pauses = 0  # offline preemptions resumed from the host tier, not recomputed
        self.tokens_recomputed = 0  # computed before a preemption, computed again after it
        self.tokens_restored = 0  # copied back from the host tier instead
        self._next_key = 0
        self._front_key = 0
        self._offline_step_s: float | None = None  # derived from the latency model once
        self._last_online = float("-inf")  # clock() when online work was last seen
        # measured / predicted time of recent steps planned under the online TPOT budget
        # (with offline work in them or not: a budget too small for any offline work must
        # still hear that steps are on time again): the budget is divided by a high quantile
        # of it, so a model that under-predicts the shapes co-serving produces (many offline
        # decodes beside online ones) is corrected
        self._budget_errors: deque[float] = deque(maxlen=64)
        self.prediction_scale = 1.0
        # full prompt blocks that running requests are still computing: block hash -> the
        # request computing it (see SHARED_PREFIX_MIN_BLOCKS), and each request's hashes
        self._computing: dict[BlockHash, Request] = {}
        self._computing_of: dict[str, list[BlockHash]] = {}
        self.num_shared_waits = 0  # admissions put off to share a prefix being computed

    @property
    def tpot_budget(self) -> float | None:
        """Predicted seconds an offline-carrying step may take while online work exists: the
        TPOT SLO minus the margin, less for an online request that is behind it."""
        if self.config.tpot_slo is None or self.latency is None:
            return None
        base = self.config.tpot_slo * (1 - self.config.slo_margin)
        now = self.clock()
        budget = base
        for r in self.running:
            if r.request_class is ONLINE and r.first_token_time is not None:
                # After this step the request's TPOT is (now + step - first) / k, with k
                # tokens after its first: keep that inside the budget. A request that lost
                # time (to another request's prompt, say) gets it back from offline work.
                k = r.num_output_tokens
                budget = min(budget, base * k - (now - r.first_token_time))
        return max(budget, 0.0) / self.prediction_scale

    def observe_budgeted(self, predicted: float, measured: float) -> None:
        """A step planned under the online TPOT budget took `measured` seconds against the
        `predicted`: update `prediction_scale` (the 90th percentile of measured / predicted
        over the last 64 such steps, between 1 and 2; 1 until there are 8)."""
        if predicted <= 0:
            return
        self._budget_errors.append(measured / predicted)
        if len(self._budget_errors) < 8:
            return
        ranked = sorted(self._budget_errors)
        p90 = ranked[int(0.9 * (len(ranked) - 1))]
        self.prediction_scale = min(2.0, max(1.0, p90))

    def _short_offline_steps(self) -> bool:
        """Online requests were seen in the last ONLINE_RECENT_S seconds (more may come, and
        a step they stop loses its work), and there is a step limit to apply."""
        recent = self.clock() - self._last_online <= ONLINE_RECENT_S
        return recent and self.offline_step_limit is not None

    @property
    def offline_step_limit(self) -> float | None:
        """Predicted seconds of a conserve step with no online work: its offline prompt
        chunks are cut to fit (its decodes are not; prompt chunks then get a quarter of it
        on top of them). Long enough that the fixed cost of a step (a one-token step) is at
        most a tenth of it; longer would not be faster, and a step stopped for an arriving
        online request loses the work it has done."""
        if self.config.offline_step_s is not None:
            return self.config.offline_step_s
        if self.latency is None:
            return None
        if self._offline_step_s is None:
            self._offline_step_s = 10 * self.latency.predict(BatchShape().with_chunk(0, 1))
        return self._offline_step_s

    # -- queue ------------------------------------------------------------------------------
    @property
    def waiting(self) -> list[Request]:
        """All waiting requests in queue order (preempted ones first)."""
        return sorted((*self.queues[ONLINE], *self.queues[OFFLINE]), key=lambda r: r.queue_key)

    def num_waiting(self, request_class: RequestClass | None = None) -> int:
        if request_class is None:
            return len(self.queues[ONLINE]) + len(self.queues[OFFLINE])
        return len(self.queues[request_class])

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self._next_key += 1
        request.queue_key = self._next_key
        self.queues[request.request_class].append(request)
        if request.request_class is ONLINE:
            self._last_online = self.clock()

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request wherever it is and release its KV blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        was_running = request.status == RequestStatus.RUNNING
        request.move_to(status)  # raises on an illegal status before anything changes
        del self.requests[request_id]
        self._forget_computing(request_id)
        if was_running:
            self.running.remove(request)
        else:
            self.queues[request.request_class].remove(request)
        self.kv.free(request_id)
        if self.host is not None:
            self.host.drop(request_id)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_online_work(self) -> bool:
        return bool(self.queues[ONLINE]) or any(r.request_class is ONLINE for r in self.running)

    # -- plan -------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        plan = _Plan(budget=self.config.max_num_batched_tokens)
        if self.config.policy == "fcfs":
            self._run(plan, list(self.running))
            if not plan.preempted:
                self._admit(plan, self._fcfs_order)
        else:
            online_present = self.has_online_work()
            if online_present:
                self._last_online = self.clock()
            self._run(plan, [r for r in self.running if r.request_class is ONLINE])
            self._admit(plan, lambda skip: _heads(self.queues[ONLINE], skip))
            if not (self.config.policy == "online-only" and online_present):
                offline = [r for r in self.running if r.request_class is OFFLINE]
                if self.config.policy == "conserve" and online_present:
                    plan.time_limit, plan.online_budget = self.tpot_budget, True
                    plan.offline_decodes_only = any(c.num_tokens > 1 for c in plan.chunks)
                elif self.config.policy == "conserve" and self._short_offline_steps():
                    # no online work: every decode, then prompt chunks up to the step limit
                    # (and at least a quarter of it, so that new requests keep starting)
                    decodes = [r for r in offline if r.num_tokens - r.num_computed_tokens == 1]
                    self._run(plan, decodes)
                    offline = [r for r in offline if r.request_id not in plan.scheduled]
                    limit = self.offline_step_limit
                    plan.time_limit = max(limit, self.latency.predict(plan.shape) + limit / 4)
                self._run(plan, offline)
                if not plan.preempted:
                    self._admit(plan, lambda skip: _heads(self.queues[OFFLINE], skip))
        predicted = self.latency.predict(plan.shape) if self.latency and plan.chunks else None
        return ScheduledBatch(
            chunks=plan.chunks,
            preempted_ids=plan.preempted,
            predicted_s=predicted,
            preemptible=self.config.policy == "conserve" and plan.num_offline > 0,
            shape=plan.shape,
            online_budget=plan.online_budget,
        )

    def _fcfs_order(self, skip: set[str]) -> Iterable[Request]:
        """Waiting requests of both classes in queue order, lazily (heads compared), those
        in `skip` passed over."""
        while True:
            on = _first(self.queues[ONLINE], skip)
            off = _first(self.queues[OFFLINE], skip)
            if on is None and off is None:
                return
            yield on if off is None or (on is not None and on.queue_key < off.queue_key) else off

    def _run(self, plan: _Plan, requests: list[Request]) -> None:
        """Schedule the next tokens of running requests, in order."""
        for request in requests:
            if plan.budget <= 0:
                return
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this plan
            left = request.num_tokens - request.num_computed_tokens
            if plan.offline_decodes_only and left > 1 and request.request_class is OFFLINE:
                continue
            n = min(left, plan.budget, self.config.chunk_cap)
            n = self._fit(plan, request, request.num_computed_tokens, n)
            if n == 0:
                continue
            target = request.num_computed_tokens + n
            if not self._make_room(plan, request, target, None):
                if request.status != RequestStatus.RUNNING:
                    return  # it preempted itself: nobody younger is left to schedule
                continue
            self.kv.allocate(request.request_id, target)
            self._add_chunk(plan, request, n)

    def _admit(self, plan: _Plan, order: Callable[[set[str]], Iterable[Request]]) -> None:
        """Start waiting requests in queue order while budget, seats and blocks last. A
        request whose prompt continues into blocks another request is computing now is passed
        over (it starts once they are cached, and computes only the rest)."""
        skip: set[str] = set()
        for request in order(skip):  # each request yielded is started, skipped, or we return
            if plan.budget <= 0:
                return
            if plan.offline_decodes_only and request.request_class is OFFLINE:
                return  # a new start computes prompt tokens
            if len(self.running) >= self.config.max_num_seqs and not self._free_seat(plan, request):
                return
            prefix = self.kv.find_prefix(request.token_ids)
            if self._shares_computing(request, prefix):
                if len(skip) >= MAX_PASSED_OVER:
                    return
                skip.add(request.request_id)
                self.num_shared_waits += 1
                continue
            start = max(prefix.num_tokens, self._restorable(request))
            n = min(request.num_tokens - start, plan.budget, self.config.chunk_cap)
            n = self._fit(plan, request, start, n)
            if n == 0:
                return
            if not self._make_room(plan, request, start + n, prefix):
                return
            _take(self.queues[request.request_class], request)
            self._start(request, prefix, start, start + n)
            self._add_chunk(plan, request, n)

    def _prompt_blocks(self, request: Request) -> int:
        """Full prompt blocks a prefix hit or a later request can share (one token is always
        left to compute)."""
        return (request.num_prompt_tokens - 1) // self.kv.block_size

    def _shares_computing(self, request: Request, prefix: PrefixHit) -> bool:
        """Whether the prompt blocks right after `prefix` are being computed by running
        requests, at least SHARED_PREFIX_MIN_BLOCKS of them (first admissions only; an online
        request waits only for online ones)."""
        if not self._computing or request.status != RequestStatus.WAITING:
            return False
        first = len(prefix.block_ids)
        last = min(self._prompt_blocks(request), first + SHARED_PREFIX_MIN_BLOCKS)
        if last - first < SHARED_PREFIX_MIN_BLOCKS:
            return False
        hashes = self.kv.block_hashes(request.token_ids, last)
        for j in range(first, last):
            owner = self._computing.get(hashes[j])
            if owner is None or owner.status != RequestStatus.RUNNING:
                return False
            if request.request_class is ONLINE and owner.request_class is OFFLINE:
                return False  # offline prefill can be held back: never wait behind it
        return True

    def _note_computing(self, request: Request, first: int) -> None:
        """Register the prompt blocks `request` will compute from block `first` on."""
        last = self._prompt_blocks(request)
        if last - first < SHARED_PREFIX_MIN_BLOCKS or not self.kv.enable_prefix_caching:
            return
        mine = []
        for h in self.kv.block_hashes(request.token_ids, last)[first:]:
            if h not in self._computing:
                self._computing[h] = request
                mine.append(h)
        if mine:
            self._computing_of[request.request_id] = mine

    def _forget_computing(self, request_id: str) -> None:
        for h in self._computing_of.pop(request_id, ()):
            del self._computing[h]

    def _fit(self, plan: _Plan, request: Request, start: int, n: int) -> int:
        """The largest m <= n tokens of an offline request that keep the predicted step time
        inside the plan's time limit (n when there is no limit)."""
        if plan.time_limit is None or request.request_class is ONLINE or self.latency is None:
            return n
        predict = self.latency.predict
        last = start + n == request.num_tokens
        if predict(plan.shape.with_chunk(start, n, last)) <= plan.time_limit:
            return n
        lo, hi = 0, n - 1  # the largest fitting m is in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if predict(plan.shape.with_chunk(start, mid, False)) <= plan.time_limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _victims(self, plan: _Plan, request: Request) -> list[Request]:
        """Running requests that may be preempted for `request`, best victim first."""
        free = [r for r in self.running if r.request_id not in plan.scheduled]
        if self.config.policy == "fcfs":
            return free[::-1]
        offline = [r for r in free if r.request_class is OFFLINE][::-1]
        if request.request_class is OFFLINE:
            return offline
        return offline + [r for r in free if r.request_class is ONLINE][::-1]

    def _make_room(
        self, plan: _Plan, request: Request, num_tokens: int, prefix: PrefixHit | None
    ) -> bool:
        """Preempt until `request` can hold `num_tokens` tokens. A running request may have to
        preempt itself (then False, and it is back in its queue). A waiting request preempts
        only offline requests, and only when it is online and the policy has classes; else it
        waits for blocks. (A prefix hit stays valid: freed blocks keep their hashes until they
        are allocated again.)"""
        rid = request.request_id
        while not self.kv.can_allocate(rid, num_tokens, prefix):
            victims = self._victims(plan, request)
            if request.status != RequestStatus.RUNNING:
                if self.config.policy == "fcfs" or request.request_class is OFFLINE:
                    return False
                victims = [v for v in victims if v.request_class is OFFLINE]
            if not victims:
                return False
            victim = victims[0]
            self._preempt(victim)
            plan.preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _free_seat(self, plan: _Plan, request: Request) -> bool:
        """Online requests take the seat of the newest unscheduled offline request."""
        if self.config.policy == "fcfs" or request.request_class is OFFLINE:
            return False
        victims = [
            r
            for r in reversed(self.running)
            if r.request_class is OFFLINE and r.request_id not in plan.scheduled
        ]
        if not victims:
            return False
        self._preempt(victims[0])
        plan.preempted.append(victims[0].request_id)
        return True

    def _restorable(self, request: Request) -> int:
        """Tokens of a paused request that the host tier can give back (whole blocks, and at
        least one token left to compute)."""
        if self.host is None or request.status != RequestStatus.PREEMPTED:
            return 0
        bs = self.kv.block_size
        return min(self.host.saved_tokens(request.request_id), (request.num_tokens - 1) // bs * bs)

    def _start(self, request: Request, prefix: PrefixHit, start: int, num_tokens: int) -> None:
        """Give `request` blocks for `num_tokens` tokens; the first `start` are in the cache:
        the prefix hit, then blocks copied back from the host tier."""
        rid = request.request_id
        self.kv.allocate(rid, num_tokens, prefix)
        if request.status == RequestStatus.WAITING:  # first admission, not a resume
            request.num_cached_tokens = prefix.num_tokens
            self.kv.record_prefix_query(request.num_prompt_tokens, prefix.num_tokens)
            self._note_computing(request, len(prefix.block_ids))
        else:
            if start > prefix.num_tokens:
                bs = self.kv.block_size
                self.host.restore(
                    rid, self.kv.block_table(rid), prefix.num_tokens // bs, start // bs
                )
                self.tokens_restored += start - prefix.num_tokens
                self.num_pauses += 1
            self.tokens_recomputed += max(0, request.num_computed_before_preemption - start)
        request.num_computed_tokens = start
        request.move_to(RequestStatus.RUNNING)
        self.running.append(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._forget_computing(request.request_id)
        self.kv.free(request.request_id)
        request.move_to(RequestStatus.PREEMPTED)
        request.num_computed_before_preemption = request.num_computed_tokens
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.preemptions_by_class[request.request_class] += 1
        self._front_key -= 1
        request.queue_key = self._front_key
        self.queues[request.request_class].appendleft(request)

    def _add_chunk(self, plan: _Plan, request: Request, n: int) -> None:
        chunk = self._chunk(request, n)
        plan.chunks.append(chunk)
        plan.scheduled.add(request.request_id)
        plan.budget -= n
        plan.shape.add(chunk.start, n, chunk.sample is not None)
        if request.request_class is OFFLINE:
            plan.num_offline += 1

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        sample = None
        if start + n == request.num_tokens:
            params = request.sampling
            sample = SampleSpec(
                params=params,
                seed_key=None
                if request.seed is None
                else (request.seed, request.num_output_tokens),
                output_token_ids=request.output_token_ids if params.has_penalties else None,
            )
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids[start : start + n],
            start=start,
            block_ids=list(self.kv.block_table(request.request_id)),
            sample=sample,
            offline=request.request_class is OFFLINE,
        )

    def checkpoint_offline(self) -> int:
        """Copy the blocks that running offline requests completed since the last call to the
        host tier (one gathered copy). Returns the number of blocks copied."""
        if self.host is None:
            return 0
        pending = {
            r.request_id: (self.kv.block_table(r.request_id), r.num_computed_tokens)
            for r in self.running
            if r.request_class is OFFLINE
            and self.host.saved_tokens(r.request_id) + self.kv.block_size <= r.num_computed_tokens
        }
        return self.host.checkpoint(pending) if pending else 0

    # -- apply ------------------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, result: StepResult) -> list[Request]:
        """Advance the computed counters and append sampled tokens. Returns the requests that
        got a new token (the caller checks their stop conditions)."""
        advanced = []
        for chunk in batch.chunks:
            request = self.requests.get(chunk.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += chunk.num_tokens
            self.kv.commit(request.request_id, request.token_ids, request.num_computed_tokens)
            if request.num_computed_tokens >= request.num_prompt_tokens:
                self._forget_computing(request.request_id)  # its prompt blocks are cached
            sampled = result.sampled.get(chunk.request_id)
            if sampled is not None:
                if request.first_token_time is None:
                    request.first_token_time = self.clock()
                request.token_ids.append(sampled.token_id)
                advanced.append(request)
        return advanced

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        if self.host is not None:
            self.host.check_integrity()
            for rid in self.host.saved_ids():
                if rid not in self.requests:
                    raise AssertionError(f"host tier holds blocks of finished request {rid}")
        live = {r.request_id for r in self.running}
        if len(live) != len(self.running) or any(
            r.status != RequestStatus.RUNNING for r in self.running
        ):
            raise AssertionError("running list is inconsistent")
        for cls, queue in self.queues.items():
            for r in queue:
                if r.request_class is not cls:
                    raise AssertionError(f"{r.request_id} is in the wrong queue")
                if r.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                    raise AssertionError(f"waiting request {r.request_id} is {r.status.value}")
                if self.kv.has(r.request_id):
                    raise AssertionError(f"waiting request {r.request_id} holds KV blocks")
        if self.kv.num_request_tables != len(self.running):
            raise AssertionError("KV tables do not match the running requests")
        if len(live) + self.num_waiting() != len(self.requests):
            raise AssertionError("requests are lost between the queues")
