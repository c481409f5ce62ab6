"""Continuous batching with chunked prefill under a token budget.

`schedule()` decides which tokens run next and reserves their KV blocks; `update()` applies what
the runner computed. Requests join and leave between any two steps.

Order of service: running requests first, oldest first (their next decode token or their next
prefill chunk), then waiting requests in queue order while budget, seats and blocks last. When a
running request needs a block and none is free, the newest running request is preempted: its
blocks are released (full blocks stay in the prefix cache), and it goes back to the front of the
waiting queue to be recomputed.
"""

from __future__ import annotations

from collections import deque

from conserve.config import SchedulerConfig
from conserve.engine.batch import SampleSpec, ScheduledBatch, ScheduledChunk, StepResult
from conserve.engine.request import Request, RequestStatus
from conserve.kv.manager import KVCacheManager, PrefixHit


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue ------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request wherever it is and release its KV blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        was_running = request.status == RequestStatus.RUNNING
        request.move_to(status)  # raises on an illegal status before anything changes
        del self.requests[request_id]
        if was_running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request_id)
        return request

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # -- plan -------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget, self.config.chunk_cap)
            target = request.num_computed_tokens + n
            while not self.kv.can_allocate(request.request_id, target):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break  # it preempted itself: nobody younger is left to schedule
            self.kv.allocate(request.request_id, target)
            chunks.append(self._chunk(request, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        return ScheduledBatch(chunks=chunks, preempted_ids=preempted)

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix = self.kv.find_prefix(request.token_ids)
            start = prefix.num_tokens
            n = min(request.num_tokens - start, budget, self.config.chunk_cap)
            if not self.kv.can_allocate(request.request_id, start + n, prefix):
                break
            self.waiting.popleft()
            self._admit(request, prefix, start + n)
            chunks.append(self._chunk(request, n))
            budget -= n
        return budget

    def _admit(self, request: Request, prefix: PrefixHit, num_tokens: int) -> None:
        self.kv.allocate(request.request_id, num_tokens, prefix)
        if request.status == RequestStatus.WAITING:  # first admission, not a resume
            request.num_cached_tokens = prefix.num_tokens
            self.kv.record_prefix_query(request.num_prompt_tokens, prefix.num_tokens)
        request.num_computed_tokens = prefix.num_tokens
        request.move_to(RequestStatus.RUNNING)
        self.running.append(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.move_to(RequestStatus.PREEMPTED)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

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
        )

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
            sampled = result.sampled.get(chunk.request_id)
            if sampled is not None:
                request.token_ids.append(sampled.token_id)
                advanced.append(request)
        return advanced

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        live = {r.request_id for r in self.running}
        if len(live) != len(self.running) or any(
            r.status != RequestStatus.RUNNING for r in self.running
        ):
            raise AssertionError("running list is inconsistent")
        for r in self.waiting:
            if r.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                raise AssertionError(f"waiting request {r.request_id} is {r.status.value}")
            if self.kv.has(r.request_id):
                raise AssertionError(f"waiting request {r.request_id} holds KV blocks")
        if self.kv.num_request_tables != len(self.running):
            raise AssertionError("KV tables do not match the running requests")
