"""Scheduler driven by a fake runner: chunked prefill, budgets, preemption, aborts, prefix hits.

The fake runner stands in for the model. It keeps a paged "KV cache" that stores token ids in
(block, offset) slots: every chunk must find the right tokens at all earlier positions of its
block table (this checks prefix reuse and recomputation after preemption), then writes its own
tokens. A sampled token is `1000 + context length`, so the expected outputs of a request are
known in advance and do not depend on batching or preemption.
"""

from __future__ import annotations

import pytest

from conserve.config import SchedulerConfig
from conserve.engine.batch import ScheduledBatch, StepResult
from conserve.engine.policy import FcfsPolicy, make_policy
from conserve.engine.request import IllegalTransition, Request, RequestStatus
from conserve.engine.scheduler import Scheduler
from conserve.kv.manager import KVCacheManager
from conserve.sampling.params import SamplingParams
from conserve.sampling.types import SampledToken

BS = 4


def fake_token(context_len: int) -> int:
    return 1000 + context_len


def expected_output(prompt_len: int, max_tokens: int) -> list[int]:
    return [fake_token(prompt_len + k) for k in range(max_tokens)]


class FakeRunner:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.slots: dict[tuple[int, int], int] = {}

    def _slot(self, block_ids: list[int], pos: int) -> tuple[int, int]:
        return block_ids[pos // BS], pos % BS

    def execute(self, batch: ScheduledBatch) -> StepResult:
        sampled: dict[str, SampledToken] = {}
        for chunk in batch.chunks:
            request = self.scheduler.requests[chunk.request_id]
            blocks = list(chunk.block_ids)
            assert len(blocks) * BS >= chunk.context_len
            assert list(chunk.token_ids) == request.token_ids[chunk.start : chunk.context_len]
            for pos in range(chunk.start):
                assert self.slots.get(self._slot(blocks, pos)) == request.token_ids[pos], (
                    f"{chunk.request_id}: stale KV at position {pos}"
                )
            for pos, token in enumerate(chunk.token_ids, start=chunk.start):
                self.slots[self._slot(blocks, pos)] = token
            if chunk.sample is not None:
                sampled[chunk.request_id] = SampledToken(fake_token(chunk.context_len))
        return StepResult(sampled=sampled)


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 16,
    chunk: int | None = None,
    prefix_caching: bool = True,
) -> tuple[Scheduler, FakeRunner]:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_prefill_chunk=chunk
    )
    scheduler = Scheduler(config, KVCacheManager(num_blocks, BS, prefix_caching), FcfsPolicy())
    return scheduler, FakeRunner(scheduler)


def make_request(
    rid: str,
    prompt_len: int,
    max_tokens: int,
    base: int = 0,
    seed: int | None = None,
    **params: object,
) -> Request:
    base = base or 100 * (sum(map(ord, rid)) % 50 + 1)  # distinct first blocks
    prompt = list(range(base, base + prompt_len))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, **params)
    return Request(rid, prompt, sampling, seed=seed)


def step(scheduler: Scheduler, runner: FakeRunner) -> ScheduledBatch:
    """schedule -> execute -> update, finishing requests that reached max_tokens."""
    batch = scheduler.schedule()
    scheduler.check_integrity()
    result = runner.execute(batch)
    for request in scheduler.update(batch, result):
        if request.num_output_tokens >= request.sampling.max_tokens:
            scheduler.finish(request.request_id, RequestStatus.FINISHED_LENGTH)
    scheduler.check_integrity()
    return batch


def run_all(scheduler: Scheduler, runner: FakeRunner, max_steps: int = 500) -> list[ScheduledBatch]:
    batches = []
    while scheduler.num_unfinished:
        assert len(batches) < max_steps, "scheduler made no progress"
        batches.append(step(scheduler, runner))
    return batches


def shape(batch: ScheduledBatch) -> list[tuple[str, int, int, bool]]:
    """(request, start, num_tokens, samples) per chunk."""
    return [(c.request_id, c.start, c.num_tokens, c.sample is not None) for c in batch.chunks]


def assert_idle(scheduler: Scheduler) -> None:
    assert scheduler.num_unfinished == 0
    assert not scheduler.running and not scheduler.waiting
    assert scheduler.kv.num_request_tables == 0
    assert scheduler.kv.pool.num_free_blocks == scheduler.kv.pool.num_blocks
    assert scheduler.schedule().empty
    scheduler.check_integrity()


def test_single_request_prefills_then_decodes_one_token_per_step() -> None:
    scheduler, runner = make_scheduler(num_blocks=16)
    request = make_request("a", 10, 3, base=100)
    scheduler.add(request)

    b1 = step(scheduler, runner)
    assert shape(b1) == [("a", 0, 10, True)]
    assert list(b1.chunks[0].block_ids) == [0, 1, 2]
    assert b1.chunks[0].sample is not None and b1.chunks[0].sample.seed_key is None
    assert request.num_computed_tokens == 10
    assert request.output_token_ids == [1010]

    b2 = step(scheduler, runner)
    assert shape(b2) == [("a", 10, 1, True)]
    assert list(b2.chunks[0].token_ids) == [1010]
    b3 = step(scheduler, runner)
    assert shape(b3) == [("a", 11, 1, True)]

    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == expected_output(10, 3)
    assert_idle(scheduler)


def test_long_prompt_is_split_by_the_budget_and_only_the_last_chunk_samples() -> None:
    scheduler, runner = make_scheduler(budget=8)
    scheduler.add(make_request("a", 20, 2))
    assert shape(step(scheduler, runner)) == [("a", 0, 8, False)]
    assert scheduler.requests["a"].num_output_tokens == 0
    assert shape(step(scheduler, runner)) == [("a", 8, 8, False)]
    assert shape(step(scheduler, runner)) == [("a", 16, 4, True)]
    assert shape(step(scheduler, runner)) == [("a", 20, 1, True)]
    assert_idle(scheduler)


def test_max_prefill_chunk_caps_each_request_below_the_budget() -> None:
    scheduler, runner = make_scheduler(budget=64, chunk=5)
    scheduler.add(make_request("a", 12, 1))
    scheduler.add(make_request("b", 3, 1))
    assert shape(step(scheduler, runner)) == [("a", 0, 5, False), ("b", 0, 3, True)]
    assert shape(step(scheduler, runner)) == [("a", 5, 5, False)]
    assert shape(step(scheduler, runner)) == [("a", 10, 2, True)]
    assert_idle(scheduler)


def test_budget_is_shared_between_requests_in_queue_order() -> None:
    scheduler, runner = make_scheduler(budget=16)
    scheduler.add(make_request("a", 10, 2))
    scheduler.add(make_request("b", 10, 2))
    assert shape(step(scheduler, runner)) == [("a", 0, 10, True), ("b", 0, 6, False)]
    assert shape(step(scheduler, runner)) == [("a", 10, 1, True), ("b", 6, 4, True)]
    assert shape(step(scheduler, runner)) == [("b", 10, 1, True)]
    assert_idle(scheduler)


def test_running_requests_are_served_before_waiting_ones() -> None:
    scheduler, runner = make_scheduler(budget=8)
    scheduler.add(make_request("a", 20, 2))
    assert shape(step(scheduler, runner)) == [("a", 0, 8, False)]
    scheduler.add(make_request("b", 5, 2))
    # the running prefill takes the whole budget: b waits
    assert shape(step(scheduler, runner)) == [("a", 8, 8, False)]
    assert [r.request_id for r in scheduler.waiting] == ["b"]
    assert shape(step(scheduler, runner)) == [("a", 16, 4, True), ("b", 0, 4, False)]
    # a's decode comes first, then b's last prompt token
    assert shape(step(scheduler, runner)) == [("a", 20, 1, True), ("b", 4, 1, True)]
    assert shape(step(scheduler, runner)) == [("b", 5, 1, True)]
    assert_idle(scheduler)


def test_max_num_seqs_limits_running_requests() -> None:
    scheduler, runner = make_scheduler(max_num_seqs=2)
    for rid in "abcd":
        scheduler.add(make_request(rid, 3, 2))
    assert [c.request_id for c in step(scheduler, runner).chunks] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]
    assert [c.request_id for c in step(scheduler, runner).chunks] == ["a", "b"]
    # a and b finished: their seats go to c and d
    assert [c.request_id for c in step(scheduler, runner).chunks] == ["c", "d"]
    run_all(scheduler, runner)
    assert_idle(scheduler)


def test_limits_hold_on_a_mixed_workload_and_all_outputs_are_exact() -> None:
    budget, cap, seats = 16, 6, 4
    scheduler, runner = make_scheduler(budget=budget, chunk=cap, max_num_seqs=seats)
    specs = {"a": (10, 4), "b": (3, 6), "c": (17, 2), "d": (6, 5), "e": (25, 3), "f": (9, 7)}
    requests = [make_request(rid, p, m) for rid, (p, m) in specs.items()]
    for r in requests:
        scheduler.add(r)

    first = step(scheduler, runner)
    assert shape(first) == [
        ("a", 0, 6, False),
        ("b", 0, 3, True),
        ("c", 0, 6, False),
        ("d", 0, 1, False),
    ]
    batches = [first, *run_all(scheduler, runner)]
    for batch in batches:
        assert batch.num_tokens <= budget
        assert len(batch.chunks) <= seats
        assert all(1 <= c.num_tokens <= cap for c in batch.chunks)
        assert len({c.request_id for c in batch.chunks}) == len(batch.chunks)
    assert max(b.num_tokens for b in batches) == budget  # the budget was the binding limit
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_output(*specs[r.request_id])
    assert scheduler.num_preemptions == 0
    assert_idle(scheduler)


def test_newest_running_request_is_preempted_when_blocks_run_out() -> None:
    scheduler, runner = make_scheduler(num_blocks=6)
    for rid in "abc":
        scheduler.add(make_request(rid, 7, 8))
    b1 = step(scheduler, runner)  # 2 blocks each: the pool is full
    assert [c.request_id for c in b1.chunks] == ["a", "b", "c"]
    assert scheduler.kv.pool.num_free_blocks == 0
    b2 = step(scheduler, runner)  # token 8 still fits in the second block
    assert list(b2.preempted_ids) == []

    b3 = scheduler.schedule()  # a needs a third block: c, the newest, gives up its blocks
    assert list(b3.preempted_ids) == ["c"]
    assert [c.request_id for c in b3.chunks] == ["a", "b"]
    c = scheduler.requests["c"]
    assert c.status == RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0
    assert c.num_preemptions == 1
    assert c.output_token_ids == expected_output(7, 2)  # generated tokens are kept
    assert list(scheduler.waiting) == [c]
    assert not scheduler.kv.has("c")
    assert scheduler.num_preemptions == 1
    scheduler.check_integrity()


def test_tiny_pool_preempts_recomputes_and_completes_everything() -> None:
    scheduler, runner = make_scheduler(num_blocks=6)
    specs = {"a": (7, 8), "b": (7, 8), "c": (9, 12), "d": (5, 10)}
    requests = [make_request(rid, p, m) for rid, (p, m) in specs.items()]
    for r in requests:
        scheduler.add(r)
    preempted_seen = 0
    while scheduler.num_unfinished:
        batch = step(scheduler, runner)
        for rid in batch.preempted_ids:
            preempted_seen += 1
            victim = scheduler.requests[rid]
            assert victim.status == RequestStatus.PREEMPTED
            assert victim.num_computed_tokens == 0
            assert victim in scheduler.waiting
            assert not scheduler.kv.has(rid)
        assert preempted_seen < 200, "livelock"

    assert scheduler.num_preemptions > 0
    assert scheduler.num_preemptions == preempted_seen == sum(r.num_preemptions for r in requests)
    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_output(*specs[r.request_id])
    assert_idle(scheduler)


def test_request_preempts_itself_and_resumes_from_its_cached_blocks() -> None:
    scheduler, runner = make_scheduler(num_blocks=4)
    scheduler.add(make_request("a", 5, 3))
    scheduler.add(make_request("b", 8, 3))
    step(scheduler, runner)  # a: 2 blocks (room for 8 tokens), b: 2 full blocks

    b2 = step(scheduler, runner)  # b needs a third block and is the newest: it yields
    assert list(b2.preempted_ids) == ["b"]
    assert shape(b2) == [("a", 5, 1, True)]
    b = scheduler.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0

    # b's two full blocks stay cached, but it needs one more and none is free: it waits
    assert shape(step(scheduler, runner)) == [("a", 6, 1, True)]
    assert b.status == RequestStatus.PREEMPTED

    # a finished; b resumes with a prefix hit on its own 8 cached tokens
    assert shape(step(scheduler, runner)) == [("b", 8, 1, True)]
    assert b.num_cached_tokens == 0  # counted at first admission only
    run_all(scheduler, runner)
    assert b.output_token_ids == expected_output(8, 3)
    assert_idle(scheduler)


def test_abort_of_running_and_waiting_requests_frees_all_blocks() -> None:
    scheduler, runner = make_scheduler(num_blocks=8, max_num_seqs=1)
    scheduler.add(make_request("a", 10, 5))
    scheduler.add(make_request("b", 6, 5))
    step(scheduler, runner)
    assert scheduler.requests["a"].status == RequestStatus.RUNNING
    assert scheduler.requests["b"].status == RequestStatus.WAITING
    assert scheduler.kv.pool.num_free_blocks == 5

    a = scheduler.finish("a", RequestStatus.FINISHED_ABORTED)
    assert a is not None and a.status == RequestStatus.FINISHED_ABORTED
    scheduler.check_integrity()
    b = scheduler.finish("b", RequestStatus.FINISHED_ABORTED)
    assert b is not None and b.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.finish("a", RequestStatus.FINISHED_ABORTED) is None
    assert_idle(scheduler)


def test_abort_while_a_step_is_in_flight_drops_its_result() -> None:
    scheduler, runner = make_scheduler()
    request = make_request("a", 6, 4)
    scheduler.add(request)
    batch = scheduler.schedule()
    result = runner.execute(batch)
    scheduler.finish("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update(batch, result) == []
    assert request.output_token_ids == []
    assert request.num_computed_tokens == 0
    assert_idle(scheduler)


def test_preempted_request_can_be_aborted_from_the_waiting_queue() -> None:
    scheduler, runner = make_scheduler(num_blocks=4)
    scheduler.add(make_request("a", 8, 3))
    scheduler.add(make_request("b", 8, 3))
    step(scheduler, runner)
    assert list(step(scheduler, runner).preempted_ids) == ["b"]
    b = scheduler.finish("b", RequestStatus.FINISHED_ABORTED)
    assert b is not None and b.status == RequestStatus.FINISHED_ABORTED
    scheduler.check_integrity()
    run_all(scheduler, runner)
    assert_idle(scheduler)


def test_second_request_with_the_same_prompt_hits_the_prefix_cache() -> None:
    scheduler, runner = make_scheduler()
    first = make_request("a", 10, 2, base=300)
    scheduler.add(first)
    step(scheduler, runner)  # a's 10 prompt tokens are computed: 2 full blocks cached
    second = make_request("b", 10, 2, base=300)
    scheduler.add(second)

    batch = step(scheduler, runner)
    assert shape(batch) == [("a", 10, 1, True), ("b", 8, 2, True)]
    a_blocks, b_blocks = (list(c.block_ids) for c in batch.chunks)
    assert b_blocks[:2] == a_blocks[:2]
    assert b_blocks[2] != a_blocks[2]
    assert second.num_cached_tokens == 8
    assert first.num_cached_tokens == 0
    assert (scheduler.kv.prefix_queries, scheduler.kv.prefix_hits) == (20, 8)

    run_all(scheduler, runner)
    assert second.output_token_ids == first.output_token_ids == expected_output(10, 2)
    assert_idle(scheduler)


def test_prefix_hit_after_the_first_request_finished() -> None:
    scheduler, runner = make_scheduler()
    scheduler.add(make_request("a", 13, 1, base=300))
    run_all(scheduler, runner)
    second = make_request("b", 13, 1, base=300)
    scheduler.add(second)
    assert shape(step(scheduler, runner)) == [("b", 12, 1, True)]
    assert second.num_cached_tokens == 12
    assert_idle(scheduler)


def test_no_prefix_hit_when_prefix_caching_is_disabled() -> None:
    scheduler, runner = make_scheduler(prefix_caching=False)
    scheduler.add(make_request("a", 10, 2, base=300))
    step(scheduler, runner)
    second = make_request("b", 10, 2, base=300)
    scheduler.add(second)
    assert shape(step(scheduler, runner)) == [("a", 10, 1, True), ("b", 0, 10, True)]
    assert second.num_cached_tokens == 0
    run_all(scheduler, runner)
    assert_idle(scheduler)


def test_sample_spec_carries_seed_key_and_penalty_history() -> None:
    scheduler, runner = make_scheduler()
    scheduler.add(make_request("s", 4, 3, base=300, seed=42, presence_penalty=0.5))
    scheduler.add(make_request("p", 4, 3, base=400))
    specs = []
    for _ in range(3):
        batch = step(scheduler, runner)
        specs.append({c.request_id: c.sample for c in batch.chunks})
    assert [s["s"].seed_key for s in specs] == [(42, 0), (42, 1), (42, 2)]
    assert [list(s["s"].output_token_ids) for s in specs] == [[], [1004], [1004, 1005]]
    assert all(s["p"].seed_key is None and s["p"].output_token_ids is None for s in specs)
    assert_idle(scheduler)


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (RequestStatus.WAITING, RequestStatus.FINISHED_LENGTH),
        (RequestStatus.WAITING, RequestStatus.PREEMPTED),
        (RequestStatus.RUNNING, RequestStatus.WAITING),
        (RequestStatus.RUNNING, RequestStatus.RUNNING),
        (RequestStatus.PREEMPTED, RequestStatus.FINISHED_STOPPED),
        (RequestStatus.FINISHED_LENGTH, RequestStatus.RUNNING),
        (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ABORTED),
    ],
)
def test_illegal_status_transitions_raise(start: RequestStatus, target: RequestStatus) -> None:
    request = make_request("a", 3, 1)
    request.status = start
    with pytest.raises(IllegalTransition):
        request.move_to(target)
    assert request.status == start


def test_legal_status_transitions() -> None:
    request = make_request("a", 3, 1)
    for status in (
        RequestStatus.RUNNING,
        RequestStatus.PREEMPTED,
        RequestStatus.RUNNING,
        RequestStatus.FINISHED_STOPPED,
    ):
        request.move_to(status)
        assert request.status == status
    assert request.is_finished


def test_finishing_a_waiting_request_as_length_is_illegal() -> None:
    scheduler, _ = make_scheduler()
    scheduler.add(make_request("a", 3, 1))
    with pytest.raises(IllegalTransition):
        scheduler.finish("a", RequestStatus.FINISHED_LENGTH)
    # the refused finish left the request where it was
    assert scheduler.num_unfinished == 1 and len(scheduler.waiting) == 1
    scheduler.check_integrity()


def test_duplicate_request_id_raises() -> None:
    scheduler, _ = make_scheduler()
    scheduler.add(make_request("a", 3, 1))
    with pytest.raises(ValueError, match="duplicate"):
        scheduler.add(make_request("a", 5, 1))
    assert scheduler.num_unfinished == 1
    assert len(scheduler.waiting) == 1
    scheduler.check_integrity()


def test_request_and_config_validation() -> None:
    with pytest.raises(ValueError):
        Request("a", [], SamplingParams())
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError):
        SchedulerConfig(max_prefill_chunk=0)
    assert SchedulerConfig(max_num_batched_tokens=32).chunk_cap == 32
    assert SchedulerConfig(max_num_batched_tokens=32, max_prefill_chunk=8).chunk_cap == 8


def _sharing(rid: str, shared: list[int], tail: int, max_tokens: int, **kw) -> Request:
    base = 100 * (sum(map(ord, rid)) % 50 + 1) + 50_000
    prompt = shared + list(range(base, base + tail))
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), **kw)


def test_a_request_waits_for_a_shared_prefix_being_computed_instead_of_computing_it_twice():
    from conserve.engine.shared_prefix import SHARED_PREFIX_MIN_BLOCKS

    scheduler, runner = make_scheduler(budget=64)
    shared = list(range(700, 700 + 6 * BS))  # 6 blocks, more than SHARED_PREFIX_MIN_BLOCKS
    assert SHARED_PREFIX_MIN_BLOCKS <= 6
    a, b = _sharing("a", shared, 6, 2), _sharing("b", shared, 6, 2)
    c = make_request("c", 8, 2)  # shares nothing: may start past the waiting b
    for r in (a, b, c):
        scheduler.add(r)
    first = step(scheduler, runner)
    assert shape(first) == [("a", 0, 30, True), ("c", 0, 8, True)]
    assert [r.request_id for r in scheduler.waiting] == ["b"]
    second = step(scheduler, runner)
    assert ("b", 24, 6, True) in shape(second)  # only its own tail
    assert b.num_cached_tokens == 24
    run_all(scheduler, runner)
    assert a.output_token_ids == b.output_token_ids == expected_output(30, 2)
    assert (scheduler.kv.prefix_queries, scheduler.kv.prefix_hits) == (30 + 30 + 8, 24)
    assert scheduler.num_shared_waits == 1
    assert_idle(scheduler)


def test_a_long_shared_prefix_in_chunks_is_waited_for_until_it_is_cached():
    scheduler, runner = make_scheduler(budget=16)
    shared = list(range(700, 700 + 12 * BS))
    a, b = _sharing("a", shared, 4, 1), _sharing("b", shared, 4, 1)
    scheduler.add(a)
    scheduler.add(b)
    # a computes 16 tokens per step; b starts once the whole shared part is cached
    assert [shape(step(scheduler, runner)) for _ in range(4)] == [
        [("a", 0, 16, False)],
        [("a", 16, 16, False)],
        [("a", 32, 16, False)],
        [("a", 48, 4, True), ("b", 48, 4, True)],
    ]
    assert b.output_token_ids == a.output_token_ids == expected_output(52, 1)
    assert_idle(scheduler)


def test_short_shared_prefixes_and_an_aborted_owner_do_not_hold_anyone_back():
    scheduler, runner = make_scheduler(budget=64)
    short = list(range(700, 700 + 2 * BS))  # below SHARED_PREFIX_MIN_BLOCKS
    a, b = _sharing("a", short, 4, 1), _sharing("b", short, 4, 1)
    scheduler.add(a)
    scheduler.add(b)
    assert [c[0] for c in shape(step(scheduler, runner))] == ["a", "b"]
    run_all(scheduler, runner)
    assert_idle(scheduler)
    # the owner leaves before its prompt is cached: the waiting request starts from what is
    scheduler, runner = make_scheduler(budget=8)
    shared = list(range(900, 900 + 6 * BS))
    a, b = _sharing("a", shared, 4, 1), _sharing("b", shared, 4, 1)
    scheduler.add(a)
    scheduler.add(b)
    assert shape(step(scheduler, runner)) == [("a", 0, 8, False)]
    scheduler.finish("a", RequestStatus.FINISHED_ABORTED)
    assert shape(step(scheduler, runner)) == [("b", 8, 8, False)]
    run_all(scheduler, runner)
    assert b.output_token_ids == expected_output(28, 1)
    assert_idle(scheduler)


def test_an_online_request_never_waits_behind_an_offline_one():
    from conserve.engine.request import RequestClass

    def run(owner_class: RequestClass) -> list:
        config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=16, policy="priority")
        scheduler = Scheduler(config, KVCacheManager(64, BS), make_policy(config.policy))
        runner = FakeRunner(scheduler)
        shared = list(range(700, 700 + 12 * BS))
        scheduler.add(_sharing("owner", shared, 4, 1, request_class=owner_class))
        assert shape(step(scheduler, runner)) == [("owner", 0, 16, False)]
        scheduler.add(_sharing("on", shared, 4, 1))
        chunks = shape(step(scheduler, runner))
        run_all(scheduler, runner)
        assert_idle(scheduler)
        return chunks

    # behind an online owner it waits (the owner computes the shared blocks this step) ...
    assert run(RequestClass.ONLINE) == [("owner", 16, 16, False)]
    # ... but an offline owner's prefill can be held back, so it starts at once
    assert run(RequestClass.OFFLINE) == [("on", 16, 16, False)]


def test_a_plan_passes_over_a_bounded_number_of_waiting_requests():
    from conserve.engine.scheduler import MAX_PASSED_OVER

    scheduler, runner = make_scheduler(num_blocks=512, budget=256, max_num_seqs=64)
    shared = list(range(700, 700 + 8 * BS))
    owner = _sharing("owner", shared, 4, 1)
    waiters = [_sharing(f"w{i}", shared, 4, 1) for i in range(MAX_PASSED_OVER + 4)]
    other = make_request("other", 8, 1)
    for r in (owner, *waiters, other):
        scheduler.add(r)
    # the owner starts; MAX_PASSED_OVER waiters are passed over, then admission stops for
    # this step, so the request behind them waits one step more
    assert [c[0] for c in shape(step(scheduler, runner))] == ["owner"]
    assert scheduler.num_shared_waits == MAX_PASSED_OVER
    second = [c[0] for c in shape(step(scheduler, runner))]
    assert second == [w.request_id for w in waiters] + ["other"]
    run_all(scheduler, runner)
    assert all(w.num_cached_tokens == 32 for w in waiters)
    assert_idle(scheduler)
