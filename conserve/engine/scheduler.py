"""Continuous batching with chunked prefill and request classes: the mechanism.

`schedule()` decides which tokens run next and reserves their KV blocks; `update()` applies what
the runner computed. Requests join and leave between any two steps. A plan serves running
requests first, oldest first (the rest of a prompt in chunks of at most `chunk_cap` tokens, or
one decode token), then admits waiting ones in queue order while the token budget, the seats
and the KV blocks last. There is a waiting queue per request class; queue keys keep arrival
order across them (preempted requests get keys in front).

The policy object (`policy.py`) decides the rest: one arrival-ordered queue or online requests
first, whether and under what predicted-time limit offline work joins a step (an offline chunk
is cut to the largest size that fits, by bisection on the latency model), which running
requests may be preempted for blocks or seats, and whether a step may be stopped between
layers. A preempted request releases its blocks (full ones stay in the prefix cache) and goes
back to the front of its queue, to be recomputed or restored from its host-tier checkpoints.
A waiting request whose prompt continues into blocks that a running request is computing now
waits until they are cached (`shared_prefix.py`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from conserve.config import SchedulerConfig
from conserve.engine.batch import ScheduledBatch, ScheduledChunk, StepResult
from conserve.engine.latency import BatchShape
from conserve.engine.policy import ONLINE_PROMPT_PASSES, Policy
from conserve.engine.request import Request, RequestClass, RequestStatus
from conserve.engine.shared_prefix import SharedPrefixWaits
from conserve.kv.host_tier import HostKVStore
from conserve.kv.manager import KVCacheManager, PrefixHit
from conserve.sampling.types import SampleSpec

ONLINE, OFFLINE = RequestClass.ONLINE, RequestClass.OFFLINE
# A plan passes over at most this many waiting requests that wait for a shared prefix (each
# costs a prefix lookup): the rest of the queue waits for the next step
MAX_PASSED_OVER = 16


def _first(queue: deque[Request], skip: set[str]) -> Request | None:
    return next((r for r in queue if r.request_id not in skip), None)


def _heads(queue: deque[Request], skip: set[str]) -> Iterable[Request]:
    """The first request of the queue not in `skip`, again after each time the consumer takes
    it or adds it to `skip`."""
    while (r := _first(queue, skip)) is not None:
        yield r


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
    # an offline prompt chunk cut to fit the time limit has at least this many tokens (or is
    # not scheduled): a few prompt tokens beside online work cost far more than their share
    min_offline_chunk: int = 1
    num_offline: int = 0
    online_s: float | None = None  # predicted seconds of the plan's online work alone
    # online prompt chunks beyond the first only while their tokens stay within this (None:
    # no limit); online_prompt: the online prompt tokens planned so far
    online_prompt_cap: int | None = None
    online_prompt: int = 0


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        policy: Policy,
        host: HostKVStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config  # token budget, seats, chunk cap (the policy is `policy`)
        self.policy = policy
        self.clock = clock  # stamps first tokens; the policy's time budgets read it
        self.kv = kv
        self.host = host  # checkpoints of offline requests (policies with a host tier)
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
        self.shared = SharedPrefixWaits(kv)
        self.num_shared_waits = 0  # admissions put off to share a prefix being computed
        # Requests of a stopped step the engine will resume: their next tokens are in flight,
        # so plans pass them over. Finishing or preempting one of them frees blocks the step
        # still writes to: `held_broken` then tells the engine to drop the step instead.
        self.held: set[str] = set()
        self.held_broken = False

    def set_policy(self, policy: Policy) -> None:
        """Plan with `policy` from now on; only with no request in the scheduler (a policy
        keeps state about the requests it planned)."""
        if self.requests:
            raise RuntimeError("the policy can change only while no request is in the scheduler")
        self.policy = policy

    def hold(self, request_ids: Iterable[str]) -> None:
        """Keep these running requests (a stopped step's) out of plans until `release`."""
        self.held = set(request_ids)
        self.held_broken = False

    def release(self) -> None:
        """The held step was resumed to its end, or dropped: plan its requests again."""
        self.held = set()
        self.held_broken = False

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
            self.policy.note_online(self.clock())

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request wherever it is and release its KV blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        was_running = request.status == RequestStatus.RUNNING
        request.move_to(status)  # raises on an illegal status before anything changes
        if request_id in self.held:
            self.held_broken = True
        del self.requests[request_id]
        self.shared.forget(request_id)
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
        if self.policy.online_first:
            self._plan_by_class(plan)
        else:
            self._run(plan, list(self.running))
            if not plan.preempted:
                self._admit(plan, self._arrival_order)
        latency = self.policy.latency
        predicted = latency.predict(plan.shape) if latency and plan.chunks else None
        return ScheduledBatch(
            chunks=plan.chunks,
            preempted_ids=plan.preempted,
            predicted_s=predicted,
            preemptible=self.policy.preemptible(plan.num_offline),
            shape=plan.shape,
            online_budget=plan.online_budget,
            online_predicted_s=plan.online_s,
        )

    def _plan_by_class(self, plan: _Plan) -> None:
        """Online requests (running, then waiting), then offline ones within the limits the
        policy sets for this step."""
        online_present = self.has_online_work()
        if online_present:
            self.policy.note_online(self.clock())
        plan.online_prompt_cap = self.policy.online_prompt_tokens
        self._run(plan, [r for r in self.running if r.request_class is ONLINE])
        if plan.online_prompt_cap is None:
            self._admit(plan, lambda skip: _heads(self.queues[ONLINE], skip))
        else:
            self._admit(plan, self._shortest_online)
            self._count_passes(plan)
        if not self.policy.runs_offline(online_present):
            return
        offline = [r for r in self.running if r.request_class is OFFLINE]
        online_prefill = any(c.num_tokens > 1 for c in plan.chunks)
        latency = self.policy.latency
        if latency is not None and plan.chunks:
            plan.online_s = latency.predict(plan.shape)  # the online work alone
        limits = self.policy.offline_budget(
            self.running, online_present, online_prefill, self.clock(), replace(plan.shape)
        )
        plan.online_budget, plan.offline_decodes_only = limits.online_budget, limits.decodes_only
        plan.min_offline_chunk = limits.min_prompt_tokens
        if limits.decodes_first:
            decodes = [r for r in offline if r.num_tokens - r.num_computed_tokens == 1]
            self._run(plan, decodes)  # no time limit yet: decodes are never cut
            offline = [r for r in offline if r.request_id not in plan.scheduled]
            plan.time_limit = limits.prompt_limit(self.policy.latency.predict(plan.shape))
        else:
            plan.time_limit = limits.time_limit
            if limits.min_prompt_tokens > 1:  # decodes first: a prompt chunk may not fit
                offline.sort(key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        self._run(plan, offline)
        if not plan.preempted:
            self._admit(plan, lambda skip: _heads(self.queues[OFFLINE], skip))

    def _shortest_online(self, skip: set[str]) -> Iterable[Request]:
        """Waiting online requests, those in `skip` passed over: any passed over in
        ONLINE_PROMPT_PASSES steps first (oldest first), then the fewest tokens to compute."""
        while True:
            left = [r for r in self.queues[ONLINE] if r.request_id not in skip]
            if not left:
                return
            yield min(
                left,
                key=lambda r: (
                    r.passed_over < ONLINE_PROMPT_PASSES,
                    r.num_tokens - r.num_computed_tokens,
                    r.queue_key,
                ),
            )

    def _count_passes(self, plan: _Plan) -> None:
        """Online requests still waiting that are older than one this plan started."""
        started = [
            r.queue_key
            for rid in plan.scheduled
            if (r := self.requests[rid]).request_class is ONLINE and r.num_output_tokens == 0
        ]
        if not started:
            return
        newest = max(started)
        for r in self.queues[ONLINE]:
            if r.queue_key < newest:
                r.passed_over += 1

    def _online_prompt_fits(self, plan: _Plan, request: Request, n: int) -> bool:
        """Whether an online prompt chunk of `n` tokens may join this plan (`online_prompt_cap`:
        the plan's first one always does)."""
        if plan.online_prompt_cap is None or request.request_class is not ONLINE:
            return True
        return plan.online_prompt == 0 or plan.online_prompt + n <= plan.online_prompt_cap

    def _arrival_order(self, skip: set[str]) -> Iterable[Request]:
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
            if request.status != RequestStatus.RUNNING or request.request_id in self.held:
                continue  # preempted earlier in this plan, or its next tokens are in flight
            left = request.num_tokens - request.num_computed_tokens
            if plan.offline_decodes_only and left > 1 and request.request_class is OFFLINE:
                continue
            n = min(left, plan.budget, self.config.chunk_cap)
            n = self._fit(plan, request, request.num_computed_tokens, n)
            if left > 1 and not self._online_prompt_fits(plan, request, n):
                continue  # its next chunk waits for a step with no other online prompt
            if n == 0:
                if plan.time_limit is not None and request.request_class is OFFLINE:
                    # not one more token fits the time limit: the requests after this one
                    # would cost a prediction each to learn the same
                    return
                continue
            target = request.num_computed_tokens + n
            if not self._make_room(plan, request, target, None):
                if request.status != RequestStatus.RUNNING:
                    return  # it preempted itself: nobody younger is left to schedule
                continue
            self.kv.allocate(request.request_id, target)
            self._add_chunk(plan, request, n)

    def _admit(self, plan: _Plan, order: Callable[[set[str]], Iterable[Request]]) -> None:
        """Start waiting requests in queue order while budget, seats and blocks last (an
        offline request only while the policy's `offline_seats` are not all taken). A
        request whose prompt continues into blocks another request is computing now is passed
        over (it starts once they are cached, and computes only the rest)."""
        skip: set[str] = set()
        offline_seats = self.policy.offline_seats(self.config.max_num_seqs, self.clock())
        for request in order(skip):  # each request yielded is started, skipped, or we return
            if plan.budget <= 0:
                return
            if plan.offline_decodes_only and request.request_class is OFFLINE:
                return  # a new start computes prompt tokens
            if request.request_class is OFFLINE and len(self.running) >= offline_seats:
                return  # the seats left are kept for online arrivals
            full = len(self.running) >= self.config.max_num_seqs
            if full and self._preempt_victim(plan, request) is None:
                return  # no seat, and nobody the policy lets it take one from
            prefix = self.kv.find_prefix(request.token_ids)
            if self.shared.should_wait(request, prefix):
                if len(skip) >= MAX_PASSED_OVER:
                    return
                skip.add(request.request_id)
                self.num_shared_waits += 1
                continue
            start = max(prefix.num_tokens, self._restorable(request))
            n = min(request.num_tokens - start, plan.budget, self.config.chunk_cap)
            n = self._fit(plan, request, start, n)
            if n == 0 or not self._online_prompt_fits(plan, request, n):
                return
            if not self._make_room(plan, request, start + n, prefix):
                return
            self.queues[request.request_class].remove(request)  # by identity; the head
            self._start(request, prefix, start, start + n)
            self._add_chunk(plan, request, n)

    def _fit(self, plan: _Plan, request: Request, start: int, n: int) -> int:
        """The largest m <= n tokens of an offline request that keep the predicted step time
        inside the plan's time limit (n when there is no limit; 0 when a cut chunk would be
        shorter than the plan's `min_offline_chunk`)."""
        latency = self.policy.latency
        if plan.time_limit is None or request.request_class is ONLINE or latency is None:
            return n
        predict = latency.predict
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
        return lo if lo >= plan.min_offline_chunk else 0

    def _preempt_victim(self, plan: _Plan, request: Request) -> Request | None:
        """Preempt the policy's best victim for `request` among the running requests not
        scheduled yet in this plan; None if it has none."""
        candidates = [r for r in self.running if r.request_id not in plan.scheduled]
        victims = self.policy.victims(request, candidates)
        victims.sort(key=lambda r: r.request_id in self.held)  # a held step's requests last
        if not victims:
            return None
        self._preempt(victims[0])
        plan.preempted.append(victims[0].request_id)
        return victims[0]

    def _make_room(
        self, plan: _Plan, request: Request, num_tokens: int, prefix: PrefixHit | None
    ) -> bool:
        """Preempt the policy's victims until `request` can hold `num_tokens` tokens. A running
        request may have to preempt itself (then False, and it is back in its queue); a waiting
        request with no victims waits for blocks. (A prefix hit stays valid: freed blocks keep
        their hashes until they are allocated again.)"""
        while not self.kv.can_allocate(request.request_id, num_tokens, prefix):
            victim = self._preempt_victim(plan, request)
            if victim is None or victim is request:
                return False
        return True

    def _restorable(self, request: Request) -> int:
        """Tokens that the host tier can give back (whole blocks, and at least one token left
        to compute): a paused request's checkpoints, or for a new request the blocks that an
        earlier engine saved for the same leading tokens (`--host-kv-path`)."""
        if self.host is None:
            return 0
        bs = self.kv.block_size
        most = (request.num_tokens - 1) // bs
        if request.status == RequestStatus.WAITING:
            return self.host.orphan_blocks(request.token_ids, most) * bs
        if request.status != RequestStatus.PREEMPTED:
            return 0
        return min(self.host.saved_tokens(request.request_id), most * bs)

    def _start(self, request: Request, prefix: PrefixHit, start: int, num_tokens: int) -> None:
        """Give `request` blocks for `num_tokens` tokens; the first `start` are in the cache:
        the prefix hit, then blocks copied back from the host tier."""
        rid = request.request_id
        self.kv.allocate(rid, num_tokens, prefix)
        bs = self.kv.block_size
        if request.status == RequestStatus.WAITING:  # first admission, not a resume
            request.num_cached_tokens = prefix.num_tokens
            self.kv.record_prefix_query(request.num_prompt_tokens, prefix.num_tokens)
            self.shared.note(request, len(prefix.block_ids))
            if start > prefix.num_tokens:  # blocks an earlier engine saved for these tokens
                self.host.adopt(rid, request.token_ids, start // bs)
                self.host.restore(
                    rid, self.kv.block_table(rid), prefix.num_tokens // bs, start // bs
                )
                self.tokens_restored += start - prefix.num_tokens
        else:
            if start > prefix.num_tokens:
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
        if request.request_id in self.held:
            self.held_broken = True
        self.running.remove(request)
        self.shared.forget(request.request_id)
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
        elif n > 1 or chunk.start < request.num_prompt_tokens:
            plan.online_prompt += n

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        sample = None
        if start + n == request.num_tokens:
            params = request.sampling
            seed = None if request.seed is None else (request.seed, request.num_output_tokens)
            penalized = request.output_token_ids if params.has_penalties else None
            sample = SampleSpec(params=params, seed_key=seed, output_token_ids=penalized)
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids[start : start + n],
            start=start,
            block_ids=list(self.kv.block_table(request.request_id)),
            sample=sample,
            offline=request.request_class is OFFLINE,
        )

    def checkpoint_offline(self, max_blocks: int | None = None) -> int:
        """Copy the blocks that running offline requests completed since the last call to the
        host tier (one gathered copy of at most `max_blocks`; the rest waits for the next
        call). Returns the number of blocks copied. Nothing is copied while at least the
        host tier's `checkpoint_free` share of the device pool is free (for a tier in memory
        only, `--host-kv-checkpoint-free`): a checkpoint only saves recomputing a request
        that is paused, which happens when online work needs blocks that are not free (and a
        paused request's full blocks stay in the prefix cache until they are taken). After
        every 2048-token step of long prompts beside online users, the copy took 11 ms, 2% of
        the offline job's time on a 2-core CPU."""
        if self.host is None:
            return 0
        pool = self.kv.pool
        if self.host.checkpoint_free < 1 and (
            pool.num_free_blocks >= self.host.checkpoint_free * pool.num_blocks
        ):
            return 0
        pending = {
            r.request_id: (self.kv.block_table(r.request_id), r.num_computed_tokens, r.token_ids)
            for r in self.running
            if r.request_class is OFFLINE
            and self.host.saved_tokens(r.request_id) + self.kv.block_size <= r.num_computed_tokens
        }
        return self.host.checkpoint(pending, max_blocks) if pending else 0

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
                self.shared.forget(request.request_id)  # its prompt blocks are cached
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
        if not self.held_broken and not self.held <= live:
            raise AssertionError("a held request is not running")
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
