"""Scheduling policies with a fake runner and a fake clock.

The fake runner (from test_scheduler) checks KV contents and produces known tokens; a linear
latency model (10 ms + 1 ms per token) stands in for the measured one, and the fake clock
advances by its prediction at every step, so latencies in these tests are exact.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from conserve.config import SchedulerConfig
from conserve.engine.latency import FEATURES, BatchShape, LatencyModel
from conserve.engine.policy import (
    BANK_MIN_PROMPT_TOKENS,
    BANK_STEPS,
    ONLINE_PROMPT_PASSES,
    ONLINE_PROMPT_TOKENS,
    Slo,
    make_policy,
)
from conserve.engine.request import Request, RequestClass, RequestStatus
from conserve.engine.scheduler import Scheduler
from conserve.kv.manager import KVCacheManager
from conserve.sampling.params import SamplingParams
from tests.test_scheduler import BS, FakeRunner, expected_output, step


def shape_of(chunks) -> BatchShape:
    shape = BatchShape()
    for c in chunks:
        shape.add(c.start, c.num_tokens, c.sample is not None)
    return shape


ONLINE, OFFLINE = RequestClass.ONLINE, RequestClass.OFFLINE
TPOT_SLO = 0.1  # seconds; with the 10% margin, offline fills steps up to 90 ms


def linear_model(const_ms: float = 10.0, per_token_ms: float = 1.0) -> LatencyModel:
    coef = np.zeros(len(FEATURES))
    coef[FEATURES.index("const")] = const_ms / 1e3
    coef[FEATURES.index("tokens")] = per_token_ms / 1e3
    return LatencyModel(coef)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    policy: str,
    num_blocks: int = 256,
    budget: int = 512,
    max_num_seqs: int = 16,
    prefix_caching: bool = True,
    clock: FakeClock | None = None,
    offline_step_s: float | None = None,
    slack: float | None = None,
) -> tuple[Scheduler, FakeRunner]:
    """A scheduler with absolute SLOs (TPOT_SLO, TTFT 1 s), or with `slack`: relative ones."""
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        policy=policy,
        tpot_slo=TPOT_SLO if slack is None else None,
        ttft_slo=1.0 if slack is None else None,
        slo_slack=0.1 if slack is None else slack,
        offline_step_s=offline_step_s,
    )
    kv = KVCacheManager(num_blocks, BS, prefix_caching)
    # as the engine builds it: the SLOs and step limit from the config
    plan = make_policy(policy, linear_model(), Slo.from_config(config), config.offline_step_s)
    # The clock stands still unless a test moves it: no online request is ever behind.
    scheduler = Scheduler(config, kv, plan, clock=clock or FakeClock())
    return scheduler, FakeRunner(scheduler)


_bases = iter(range(100, 10**9, 10_000))


def req(rid: str, klass: RequestClass, prompt_len: int, max_tokens: int) -> Request:
    base = next(_bases)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Request(rid, list(range(base, base + prompt_len)), sampling, klass)


def chunks_of(batch, klass: RequestClass, scheduler: Scheduler) -> list:
    return [c for c in batch.chunks if (c.offline if klass is OFFLINE else not c.offline)]


class Sim:
    """Steps a scheduler on a fake clock; records token times per request."""

    def __init__(self, scheduler: Scheduler, runner: FakeRunner) -> None:
        self.s, self.r = scheduler, runner
        self.now = 0.0
        self.arrival: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.batches = []

    def add(self, request: Request, at: float | None = None) -> None:
        """`request` arrived at `at` (default now); the scheduler sees it at the next step."""
        self.arrival[request.request_id] = self.now if at is None else at
        self.s.add(request)

    def step(self):
        batch = step(self.s, self.r)
        self.now += self.s.policy.latency.predict(batch.shape) if batch.chunks else 0.001
        for c in batch.chunks:
            if c.sample is not None:
                self.first.setdefault(c.request_id, self.now)
        self.batches.append(batch)
        return batch

    def ttft(self, rid: str) -> float:
        return self.first[rid] - self.arrival[rid]


@pytest.mark.parametrize("policy", ["conserve", "priority", "online-only"])
def test_online_request_is_scheduled_in_the_next_step_despite_offline_prefill(policy) -> None:
    s, r = make(policy, budget=256)
    s.add(req("off", OFFLINE, 2000, 4))
    step(s, r)  # the offline prefill is under way
    s.add(req("on", ONLINE, 40, 4))
    batch = step(s, r)
    assert batch.chunks[0].request_id == "on" and batch.chunks[0].num_tokens == 40
    if policy == "online-only":
        assert [c.request_id for c in batch.chunks] == ["on"]


def prompts_per_step(sim: Sim) -> list[list[str]]:
    """The online prompt chunks of each step so far (request ids, in plan order)."""
    return [
        [c.request_id for c in b.chunks if not c.offline and c.num_tokens > 1] for b in sim.batches
    ]


def test_conserve_starts_online_prompts_shortest_first_one_long_prompt_per_step() -> None:
    """Two prompts in one step would each get their first token when both are done (the
    linear model, like a CPU past a few dozen tokens, charges every token): one after the
    other, the short one is as fast as alone and the long one waits only for it."""
    s, r = make("conserve", budget=2048, slack=0.05)
    sim = Sim(s, r)
    sim.add(req("long", ONLINE, 500, 2))
    sim.add(req("short", ONLINE, 20, 2))
    sim.add(req("tiny", ONLINE, 10, 2))
    sim.step()
    sim.step()
    assert prompts_per_step(sim)[:2] == [["tiny", "short"], ["long"]]
    alone = {
        rid: s.policy.latency.predict(BatchShape().with_chunk(0, n))
        for rid, n in (("short", 20), ("long", 500))
    }
    # the short prompts' step is as long as theirs alone; the long prompt waited for it only
    assert sim.ttft("short") == pytest.approx(
        s.policy.latency.predict(BatchShape().with_chunk(0, 10).with_chunk(0, 20))
    )
    assert sim.ttft("long") < alone["long"] + 2 * alone["short"]
    assert 10 + 20 <= ONLINE_PROMPT_TOKENS < 20 + 500
    for _ in range(10):
        sim.step()
    assert s.num_unfinished == 0
    s.check_integrity()


def test_priority_computes_waiting_online_prompts_together_in_queue_order() -> None:
    s, r = make("priority", budget=2048)
    sim = Sim(s, r)
    sim.add(req("long", ONLINE, 500, 2))
    sim.add(req("short", ONLINE, 20, 2))
    sim.step()
    assert prompts_per_step(sim)[0] == ["long", "short"]


def test_conserve_long_prompt_passed_over_goes_first() -> None:
    """A stream of short prompts passes a long one over at most ONLINE_PROMPT_PASSES times."""
    s, r = make("conserve", budget=2048, slack=0.05)
    sim = Sim(s, r)
    sim.add(req("long", ONLINE, 300, 1))
    for i in range(ONLINE_PROMPT_PASSES + 2):
        sim.add(req(f"short-{i}", ONLINE, 100, 1))
        sim.step()
    firsts = [p[0] for p in prompts_per_step(sim)]
    assert firsts[:ONLINE_PROMPT_PASSES] == [f"short-{i}" for i in range(ONLINE_PROMPT_PASSES)]
    assert firsts[ONLINE_PROMPT_PASSES] == "long"
    for _ in range(10):
        sim.step()
    assert s.num_unfinished == 0
    s.check_integrity()


def test_conserve_as_if_alone_adds_at_most_the_slack_to_online_steps() -> None:
    """Relative objectives: a step with online work takes at most (1 + slack) times the
    predicted time of its online work alone, and offline work fills that room."""
    s, r = make("conserve", budget=512, slack=0.5)
    for i in range(3):
        s.add(req(f"dec{i}", OFFLINE, 8, 200))
    s.add(req("long", OFFLINE, 1500, 4))
    step(s, r)  # offline alone: the short prompts and a first chunk of the long one
    s.add(req("on", ONLINE, 30, 40))
    model = s.policy.latency
    with_offline = 0
    for _ in range(30):
        batch = step(s, r)
        online = [c for c in batch.chunks if not c.offline]
        if not online:
            continue
        alone = model.predict(shape_of(online))
        assert batch.online_predicted_s == pytest.approx(alone)
        assert batch.online_budget
        assert model.predict(batch.shape) <= 1.5 * alone + 1e-9
        with_offline += any(c.offline for c in batch.chunks)
        if len(online) == 1 and online[0].num_tokens == 1:  # an online decode step:
            assert all(c.num_tokens == 1 for c in batch.chunks)  # offline decodes only
    assert with_offline >= 20  # offline work rode along in most of the online steps
    # 11 ms for one online decode: 5.5 ms of room, taken by the 3 offline decodes (1 ms
    # each); the long prompt waits for a step without online work
    last = s.policy.latency.predict(batch.shape)
    assert last == pytest.approx(0.014)


def stream_beside_offline_prompts(feed_bank: bool) -> tuple[Scheduler, list, list]:
    """One online stream of 300 tokens while twelve offline requests (40-token prompts, 4
    tokens out) wait, more than its slack can compute; relative objectives, slack 10%.
    `feed_bank`: the steps are reported to the policy, as the engine does. Returns the
    scheduler, the steps with online decodes, and the offline requests finished meanwhile."""
    s, r = make("conserve", budget=512, slack=0.1)
    s.add(req("on", ONLINE, 8, 300))
    step(s, r)  # its prompt
    for i in range(12):
        s.add(req(f"off{i}", OFFLINE, 40, 4))
    decode_steps, done = [], []
    while "on" in s.requests:
        offline_before = {q.request_id for q in s.running if q.request_class is OFFLINE}
        batch = step(s, r)
        decode_steps.append(batch)
        if feed_bank:
            s.policy.observe_step(batch, s.policy.latency.predict(batch.shape))
        done += [i for i in offline_before if i not in s.requests]
    return s, decode_steps, done


def test_conserve_banks_unused_slack_for_offline_prompts_beside_a_stream() -> None:
    """A continuous online stream leaves no step without online work. Offline prompts still
    start: the slack that the steps leave unused is banked and spent on prompt chunks of at
    least BANK_MIN_PROMPT_TOKENS, and the stream's steps stay inside (1 + slack) times its
    alone time, up to the bank's cap. Without the bank they never start."""
    s, steps, done = stream_beside_offline_prompts(feed_bank=True)
    # 300 steps of 1.1 ms slack (10% of an 11 ms decode step) buy about 7 offline requests
    # of 40 ms prompt and 3 ms of decodes
    assert len(done) >= 6
    model = s.policy.latency
    alone = sum(b.online_predicted_s for b in steps)
    taken = sum(model.predict(b.shape) for b in steps)
    cap = BANK_STEPS * 0.1 * 0.011  # the bank never holds more than 32 steps' slack
    assert taken <= 1.1 * alone + cap + 1e-9
    assert taken >= 1.1 * alone - cap - 1e-9  # and the slack was used, not left idle
    prompt_chunks = [c for b in steps for c in b.chunks if c.offline and c.num_tokens > 1]
    assert prompt_chunks
    assert all(c.num_tokens >= BANK_MIN_PROMPT_TOKENS or c.start + c.num_tokens == 40
               for c in prompt_chunks)  # fmt: skip
    for b in steps:  # a step never spends more than the bank's cap beyond its budget
        assert model.predict(b.shape) <= 1.1 * b.online_predicted_s + cap + 1e-9
    s.check_integrity()
    # the same stream, steps not reported: the slack goes unused and no offline prompt runs
    s, steps, done = stream_beside_offline_prompts(feed_bank=False)
    assert done == [] and not any(c.offline for b in steps for c in b.chunks)


def test_fcfs_lets_online_wait_behind_offline_prefill() -> None:
    s, r = make("fcfs", budget=256)
    s.add(req("off", OFFLINE, 2000, 4))
    step(s, r)
    s.add(req("on", ONLINE, 40, 4))
    batch = step(s, r)
    assert [c.request_id for c in batch.chunks] == ["off"]  # the whole budget went to it


def test_conserve_keeps_predicted_step_time_inside_the_tpot_budget() -> None:
    s, r = make("conserve", budget=512)
    for i in range(4):
        s.add(req(f"on{i}", ONLINE, 8, 30))
    for i in range(3):
        s.add(req(f"off{i}", OFFLINE, 700, 3))
    limit = TPOT_SLO * 0.9
    saw_cut_chunk = False
    while s.num_unfinished:
        online_present = s.has_online_work()
        batch = step(s, r)
        predicted = s.policy.latency.predict(batch.shape)
        assert batch.predicted_s == pytest.approx(predicted)
        offline = [c for c in batch.chunks if c.offline]
        if online_present and offline:
            assert predicted <= limit + 1e-9
            saw_cut_chunk |= any(1 < c.num_tokens < 700 for c in offline)
        if not online_present:
            # no online work: offline gets a throughput-sized step (the whole token budget,
            # unless it runs out of tokens to compute)
            remaining = sum(q.num_tokens - q.num_computed_tokens for q in s.running) + sum(
                q.num_tokens for q in s.waiting
            )
            assert batch.num_tokens == min(512, batch.num_tokens + remaining)
        assert batch.preemptible == bool(offline)
    assert saw_cut_chunk
    s.check_integrity()


def test_conserve_step_with_an_online_prefill_takes_offline_decodes_only() -> None:
    s, r = make("conserve", budget=256)
    s.add(req("dec", OFFLINE, 8, 50))
    s.add(req("pre", OFFLINE, 600, 2))
    step(s, r)  # "dec" prefilled, "pre" under way: both running
    assert {x.request_id for x in s.running} == {"dec", "pre"}
    s.add(req("on", ONLINE, 20, 4))
    batch = step(s, r)  # the online prefill step
    offline = {c.request_id: c.num_tokens for c in batch.chunks if c.offline}
    assert batch.chunks[0].request_id == "on" and offline == {"dec": 1}
    s.add(req("late", OFFLINE, 30, 2))
    batch = step(s, r)  # online decodes now: offline prefill chunks are back, within budget
    offline = {c.request_id: c.num_tokens for c in batch.chunks if c.offline}
    assert offline.get("dec") == 1 and offline.get("pre", 0) > 1
    assert s.policy.latency.predict(batch.shape) <= TPOT_SLO * 0.9 + 1e-9
    while s.num_unfinished:
        step(s, r)
    s.check_integrity()


def test_offline_is_not_starved_once_online_load_stops() -> None:
    s, r = make("conserve", budget=256)
    s.add(req("off", OFFLINE, 600, 2))
    s.add(req("on", ONLINE, 200, 2))
    b1 = step(s, r)
    assert b1.chunks[0].request_id == "on"
    steps = 0
    while "off" in s.requests:
        batch = step(s, r)
        steps += 1
        if "on" not in s.requests:
            assert any(c.request_id == "off" for c in batch.chunks)
    # Once online is gone, offline prompt chunks fill the token budget (256: the idle-step
    # limit, 150 x the 11 ms one-token step, is larger), so 600 tokens take 3 steps, plus the
    # tail.
    assert s.policy.offline_step_limit == pytest.approx(1.65)
    assert steps <= 600 // 256 + 3


def test_conserve_idle_offline_steps_are_cut_to_the_step_limit_but_decodes_are_not() -> None:
    """No online work, but online requests seen recently: every offline decode runs, then
    prompt chunks up to the step limit (50 ms here), or a quarter of it on top of decodes
    that already exceed it. A minute after the last online request, steps are full again."""
    clock = FakeClock()
    s, r = make(
        "conserve", num_blocks=4096, budget=512, max_num_seqs=64, offline_step_s=0.05, clock=clock
    )
    s.add(req("on", ONLINE, 8, 1))
    step(s, r)  # the online request, done
    for i in range(60):
        s.add(req(f"r{i}", OFFLINE, 20, 100))
    saw_cut = saw_floor = False
    while s.num_unfinished:
        decoders = {q.request_id for q in s.running if q.num_output_tokens > 0}
        batch = step(s, r)
        assert batch.preemptible
        decodes = [c for c in batch.chunks if c.request_id in decoders]
        prompt = [c for c in batch.chunks if c.request_id not in decoders]
        assert {c.request_id for c in decodes} == decoders  # decodes are never cut
        shape = s.policy.latency.predict
        if prompt:
            t_dec = 0.010 + 0.001 * len(decodes) if decodes else 0.0
            limit = max(0.05, t_dec + 0.0125)
            assert shape(batch.shape) <= limit + 1e-9
            saw_floor |= t_dec > 0.05
            if prompt[-1].sample is None:  # the last chunk was cut: nothing more fitted
                assert shape(batch.shape.with_chunk(0, 1, False)) > limit
                saw_cut = True
    assert saw_cut and saw_floor
    clock.now += 61.0  # no online request for a minute: full steps
    for i in range(30):
        s.add(req(f"late{i}", OFFLINE, 20, 2))
    assert step(s, r).num_tokens == 512
    s.check_integrity()


def test_conserve_gives_a_late_online_request_its_time_back() -> None:
    """An online request loses 150 ms after its first token (say, to another request's long
    prompt). The steps after it carry less offline work until its TPOT is back inside the
    budget, and it ends inside it; with a fixed per-step budget it would end 1.6% over."""
    clock = FakeClock()
    s, r = make("conserve", budget=512, clock=clock)
    for i in range(4):
        s.add(req(f"off{i}", OFFLINE, 8, 200))
    step(s, r)  # the offline requests are decoding
    on = req("on", ONLINE, 8, 40)
    s.add(on)
    step(s, r)  # its prompt: the first token, stamped at clock.now
    first = on.first_token_time
    clock.now += 0.15
    base = TPOT_SLO * 0.9
    offline_per_step = []
    while "on" in s.requests:
        budget = s.policy.tpot_budget(s.running, s.clock())
        assert budget == pytest.approx(max(0.0, min(base, base * on.num_output_tokens - (
            clock.now - first))))  # fmt: skip
        batch = step(s, r)
        offline = [c for c in batch.chunks if c.offline]
        if offline:
            assert s.policy.latency.predict(batch.shape) <= budget + 1e-9
        offline_per_step.append(len(offline))
        if "on" in s.requests:
            last = clock.now + s.policy.latency.predict(batch.shape)
        clock.now += s.policy.latency.predict(batch.shape)
    assert offline_per_step[0] == 0  # 150 ms behind: no offline work at all
    assert offline_per_step[-1] == 4  # caught up: the whole budget again
    tpot = (last - first) / 39
    assert tpot <= base + 1e-9


def test_online_only_holds_offline_while_online_work_exists() -> None:
    s, r = make("online-only", budget=256)
    s.add(req("off", OFFLINE, 100, 20))
    step(s, r)  # offline admitted and prefilled
    s.add(req("on", ONLINE, 10, 5))
    while "on" in s.requests:
        batch = step(s, r)
        assert all(not c.offline for c in batch.chunks)
    batch = step(s, r)
    assert [c.request_id for c in batch.chunks] == ["off"]


@pytest.mark.parametrize("policy", ["priority", "conserve"])
def test_online_request_preempts_offline_for_blocks_and_offline_recomputes(policy) -> None:
    # 40 blocks of 4 tokens: the offline request holds 30 of them (its whole prompt in one
    # step: the idle-step limit is set high enough)
    s, r = make(policy, num_blocks=40, budget=512, offline_step_s=1.0)
    off = req("off", OFFLINE, 120, 8)
    s.add(off)
    step(s, r)
    s.add(req("on", ONLINE, 60, 3))
    batch = step(s, r)
    assert "off" in batch.preempted_ids and batch.chunks[0].request_id == "on"
    assert s.preemptions_by_class[OFFLINE] == 1 and s.preemptions_by_class[ONLINE] == 0
    outputs = {}
    while s.num_unfinished:
        before = {rid: q for rid, q in s.requests.items()}
        step(s, r)
        for rid, q in before.items():
            if q.is_finished:
                outputs[rid] = q.output_token_ids
    assert outputs["off"] == expected_output(120, 8)
    assert outputs["on"] == expected_output(60, 3)
    s.check_integrity()
    assert s.kv.pool.num_free_blocks == 40


def test_fcfs_never_preempts_for_a_waiting_request() -> None:
    s, r = make("fcfs", num_blocks=40, budget=512)
    s.add(req("off", OFFLINE, 120, 8))
    step(s, r)
    s.add(req("on", ONLINE, 60, 3))
    batch = step(s, r)
    assert not batch.preempted_ids and [c.request_id for c in batch.chunks] == ["off"]


def test_online_request_takes_the_seat_of_an_offline_one() -> None:
    s, r = make("priority", max_num_seqs=2)
    s.add(req("off1", OFFLINE, 8, 50))
    s.add(req("off2", OFFLINE, 8, 50))
    step(s, r)
    s.add(req("on", ONLINE, 8, 2))
    batch = step(s, r)
    assert batch.preempted_ids == ["off2"]
    assert "on" in [c.request_id for c in batch.chunks]
    assert len(s.running) == 2


def test_conserve_keeps_seats_for_online_arrivals_while_online_work_is_recent() -> None:
    """With online requests seen recently, offline requests fill at most 15 of 16 seats, so
    an online arrival starts in the free one and preempts nobody; a server that has seen no
    online request gives offline work every seat."""
    clock = FakeClock()
    s, r = make("conserve", max_num_seqs=16, clock=clock)
    for i in range(20):
        s.add(req(f"off{i}", OFFLINE, 8, 50))
    step(s, r)
    assert len(s.running) == 16  # no online request seen yet: every seat
    s.add(req("on0", ONLINE, 8, 1))  # an online request comes and goes
    while "on0" in s.requests:
        step(s, r)
    for i in range(20):  # the first job is cancelled
        s.finish(f"off{i}", RequestStatus.FINISHED_ABORTED)
    assert not s.running
    for i in range(20, 40):
        s.add(req(f"off{i}", OFFLINE, 8, 50))
    step(s, r)
    assert len(s.running) == 15  # one seat kept free
    s.add(req("on1", ONLINE, 8, 2))
    batch = step(s, r)
    assert batch.preempted_ids == []
    assert "on1" in [c.request_id for c in batch.chunks] and len(s.running) == 16
    clock.now += 61  # no online work for longer than ONLINE_RECENT_S: every seat again
    s.finish("on1", RequestStatus.FINISHED_ABORTED)
    step(s, r)
    assert len(s.running) == 16
    s.kv.check_integrity()


def test_fcfs_serves_both_classes_in_arrival_order() -> None:
    s, r = make("fcfs", budget=16)
    s.add(req("a", OFFLINE, 16, 1))
    s.add(req("b", ONLINE, 16, 1))
    s.add(req("c", OFFLINE, 16, 1))
    order = [step(s, r).chunks[0].request_id for _ in range(3)]
    assert order == ["a", "b", "c"]


def test_conserve_online_ttft_stays_near_alone_while_others_degrade() -> None:
    """Online requests arrive every 300 ms into an offline backlog. On the fake clock, an
    online request's TTFT under conserve stays within one TPOT budget of its TTFT alone once
    online work is present (steps that carry offline work are then bounded by the budget);
    the first one, arriving during a throughput-sized offline step, waits for that step (in
    the real engine, layer-wise preemption cuts that wait). Under priority every arrival waits
    for a full-budget step; under fcfs, for the offline backlog."""

    arrivals = [0.05] + [0.7 + 0.3 * k for k in range(7)]  # from 0.7 s on, online overlaps

    def run(policy: str, with_offline: bool) -> list[float]:
        s, r = make(policy, budget=512, num_blocks=2048)
        sim = Sim(s, r)
        if with_offline:
            for i in range(12):
                sim.add(req(f"off{i}", OFFLINE, 1200, 16))
        pending = list(enumerate(arrivals))
        while s.num_unfinished or pending:
            while pending and pending[0][1] <= sim.now:
                i, at = pending.pop(0)
                sim.add(req(f"on{i}", ONLINE, 64, 8), at=at)
            if s.num_unfinished:
                sim.step()
            else:
                sim.now = pending[0][1]
        return [sim.ttft(f"on{i}") for i in range(len(arrivals))]

    alone = run("conserve", with_offline=False)
    conserve = run("conserve", with_offline=True)
    priority = run("priority", with_offline=True)
    fcfs = run("fcfs", with_offline=True)
    budget = TPOT_SLO * 0.9
    full_step = 0.010 + 0.001 * 512
    # alone: the request's own prefill step, after at most one decode step of the others
    assert max(alone) <= 2 * (0.010 + 0.001 * 64) + 0.01
    # the first request arrives during a full-budget offline step and waits for it
    assert conserve[0] <= full_step + max(alone)
    # later ones wait at most for one budgeted step, then run in one budgeted step
    assert max(conserve[1:]) <= 2 * budget + 1e-9
    assert min(priority[1:]) > 2 * max(conserve[1:])
    assert min(fcfs) > 10 * max(conserve)


def test_random_mixes_finish_with_correct_tokens_under_every_policy() -> None:
    rng = random.Random(7)
    for policy in ("online-only", "fcfs", "priority", "conserve"):
        s, r = make(policy, num_blocks=60, budget=rng.choice([16, 64, 200]), max_num_seqs=6)
        pending = [
            req(
                f"{policy}{i}", rng.choice([ONLINE, OFFLINE]), rng.randint(1, 70), rng.randint(1, 9)
            )
            for i in range(40)
        ]
        expected = {
            q.request_id: expected_output(q.num_prompt_tokens, q.sampling.max_tokens)
            for q in pending
        }
        done: dict[str, list[int]] = {}
        steps = 0
        while pending or s.num_unfinished:
            for _ in range(rng.randint(0, 3)):
                if pending:
                    s.add(pending.pop())
            before = dict(s.requests)
            step(s, r)
            steps += 1
            assert steps < 5000, f"{policy}: no progress"
            for rid, q in before.items():
                if q.status is RequestStatus.FINISHED_LENGTH:
                    done[rid] = q.output_token_ids
        assert done == expected, policy
        s.check_integrity()
        assert s.kv.pool.num_free_blocks == 60


class FakeMover:
    """Moves the fake runner's KV slots to and from a host dict."""

    def __init__(self, runner: FakeRunner) -> None:
        self.runner = runner
        self.host: dict[tuple[int, int], int | None] = {}

    def save(self, device_blocks, host_blocks) -> None:
        for d, h in zip(device_blocks, host_blocks, strict=True):
            for off in range(BS):
                self.host[(h, off)] = self.runner.slots.get((d, off))

    def load(self, host_blocks, device_blocks) -> None:
        for h, d in zip(host_blocks, device_blocks, strict=True):
            for off in range(BS):
                self.runner.slots[(d, off)] = self.host[(h, off)]


def test_paused_offline_request_resumes_from_host_tier_and_recomputes_only_the_tail() -> None:
    from conserve.kv.host_tier import HostKVStore

    # no prefix cache: the paused request's KV can come back from the host tier only
    s, r = make("conserve", num_blocks=40, budget=512, prefix_caching=False, offline_step_s=1.0)
    s.host = HostKVStore(64, BS, FakeMover(r))
    off = req("off", OFFLINE, 117, 6)  # 29 full blocks + 1 token
    s.add(off)
    step(s, r)
    s.checkpoint_offline()
    assert s.host.saved_tokens("off") == 116
    blocks = list(s.kv.block_table("off"))
    s.add(req("on", ONLINE, 60, 3))
    batch = step(s, r)
    s.checkpoint_offline()
    assert batch.preempted_ids == ["off"]
    # wipe what the paused request left in device memory: only the host copy can help now
    for b in set(blocks) - set(s.kv.block_table("on")):
        for o in range(BS):
            r.slots.pop((b, o), None)
    outputs = {}
    while s.num_unfinished:
        before = dict(s.requests)
        step(s, r)  # the fake runner asserts every earlier KV position holds the right token
        s.checkpoint_offline()
        for rid, q in before.items():
            if q.is_finished:
                outputs[rid] = q.output_token_ids
    assert outputs["off"] == expected_output(117, 6)
    assert s.num_pauses == 1 and s.tokens_restored > 0
    assert s.tokens_recomputed < BS  # at most the tail after the last full block
    assert s.host.num_free_blocks == 64  # dropped when the request finished
    s.check_integrity()


def test_checkpoint_in_slices_copies_each_block_once_and_in_order() -> None:
    """`checkpoint_offline(max_blocks)` copies at most that many blocks per call (the engine
    looks for an arrived online request between calls); the calls together save every full
    block once, in order, and the restored request still computes the right tokens."""
    from conserve.kv.host_tier import HostKVStore

    s, r = make("conserve", num_blocks=40, budget=512, prefix_caching=False, offline_step_s=1.0)
    mover = FakeMover(r)
    s.host = HostKVStore(64, BS, mover)
    s.add(req("off", OFFLINE, 117, 6))  # 29 full blocks + 1 token
    step(s, r)
    copied = []
    while (n := s.checkpoint_offline(8)) > 0:
        copied.append(n)
    assert copied == [8, 8, 8, 5]
    assert s.host.saved_tokens("off") == 116
    assert sorted(h for h, _ in mover.host) == sorted(h for h in range(29) for _ in range(BS))
    s.add(req("on", ONLINE, 60, 3))
    assert step(s, r).preempted_ids == ["off"]
    done = {}
    while s.num_unfinished:
        before = dict(s.requests)
        step(s, r)  # the fake runner asserts every earlier KV position holds the right token
        s.checkpoint_offline(8)
        done.update({k: q.output_token_ids for k, q in before.items() if q.is_finished})
    assert done["off"] == expected_output(117, 6)
    assert s.tokens_recomputed < BS
    s.check_integrity()


def test_checkpoints_wait_for_a_device_pool_under_pressure() -> None:
    """A host tier with `checkpoint_free` 0.5 gets no copies while at least half the device
    pool is free, and copies once less is free; one with 1.0 (the engine's choice for a tier
    behind a file, which outlives the engine) gets them at once."""
    from conserve.kv.host_tier import HostKVStore

    s, r = make("conserve", num_blocks=200, budget=512, prefix_caching=False, offline_step_s=1.0)
    s.host = HostKVStore(128, BS, FakeMover(r), checkpoint_free=0.5)
    s.add(req("off", OFFLINE, 117, 6))  # 30 of 200 blocks
    step(s, r)
    assert s.checkpoint_offline() == 0 and s.host.saved_tokens("off") == 0
    s.add(req("big", OFFLINE, 300, 2))  # 75 more blocks: 95 of 200 free
    step(s, r)
    assert s.checkpoint_offline() == 29 + 75
    always, ar = make("conserve", num_blocks=200, budget=512, prefix_caching=False)
    always.host = HostKVStore(64, BS, FakeMover(ar), checkpoint_free=1.0)
    always.add(req("off", OFFLINE, 117, 6))
    step(always, ar)
    assert always.checkpoint_offline() == 29


def test_host_tier_that_is_full_falls_back_to_recompute() -> None:
    from conserve.kv.host_tier import HostKVStore

    s, r = make("conserve", num_blocks=40, budget=512, prefix_caching=False, offline_step_s=1.0)
    s.host = HostKVStore(3, BS, FakeMover(r))  # room for 3 of the 29 blocks
    s.add(req("off", OFFLINE, 117, 4))
    step(s, r)
    s.checkpoint_offline()
    s.add(req("on", ONLINE, 60, 3))
    step(s, r)
    done = {}
    while s.num_unfinished:
        before = dict(s.requests)
        step(s, r)
        s.checkpoint_offline()
        done.update({k: q.output_token_ids for k, q in before.items() if q.is_finished})
    assert done["off"] == expected_output(117, 4)
    # every resume restores the 3 saved blocks and recomputes the rest
    assert s.tokens_restored == 12 * s.num_pauses and s.num_pauses >= 1
    assert s.tokens_recomputed >= 116 - 12
    s.check_integrity()


def test_conserve_budget_shrinks_when_budgeted_steps_run_over_their_prediction() -> None:
    """Steps planned under the online budget that take 30% longer than predicted make the
    scheduler plan the next ones for 1/1.3 of the budget; steps faster than predicted never
    enlarge it."""
    s, r = make("conserve", budget=512)
    policy, predict = s.policy, s.policy.latency.predict
    s.add(req("on", ONLINE, 8, 60))
    for i in range(6):
        s.add(req(f"off{i}", OFFLINE, 300, 60))
    base = TPOT_SLO * 0.9
    batch = step(s, r)
    while not batch.online_budget:  # until offline work runs under the online budget
        batch = step(s, r)
    assert policy.tpot_budget(s.running, s.clock()) == pytest.approx(base)
    for _ in range(10):
        policy.observe_budgeted(0.05, 0.04)  # faster than predicted
    assert policy.prediction_scale == 1.0
    assert policy.tpot_budget(s.running, s.clock()) == pytest.approx(base)
    for _ in range(64):
        policy.observe_budgeted(0.05, 0.065)
    assert policy.prediction_scale == pytest.approx(1.3)
    assert policy.tpot_budget(s.running, s.clock()) == pytest.approx(base / 1.3)
    batch = step(s, r)
    assert batch.online_budget and any(c.offline for c in batch.chunks)
    assert predict(batch.shape) <= base / 1.3 + 1e-9
    assert predict(batch.shape) > base / 1.3 - 0.002  # filled: one more would not fit
    # Steps on time again (say, online-only steps while the budget had no room for offline
    # work) bring the scale back down.
    for _ in range(64):
        policy.observe_budgeted(0.05, 0.05)
    assert policy.prediction_scale == 1.0
    s.check_integrity()


def test_one_slow_budgeted_step_does_not_shrink_the_budget() -> None:
    s, _ = make("conserve")
    s.policy.observe_budgeted(0.03, 0.06)
    assert s.policy.prediction_scale == 1.0  # fewer than 8 observations
    for _ in range(7):
        s.policy.observe_budgeted(0.03, 0.03)
    assert s.policy.prediction_scale == 1.0  # one in eight: above the 90th percentile
