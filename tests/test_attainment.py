"""What the engine counts of co-serving: online objectives met or missed (`ObjectiveCounter`)
and the time and tokens of steps by kind (`HarvestCounter`). Made-up steps and times first,
then the real engine on a tiny model."""

from __future__ import annotations

import pytest

from conserve import LLM, SamplingParams
from conserve.engine.attainment import HarvestCounter, ObjectiveCounter, offline_share
from conserve.engine.batch import ScheduledBatch, ScheduledChunk
from conserve.engine.policy import Slo
from conserve.engine.request import Request, RequestClass, RequestStatus
from conserve.engine.stats import StepRecord


def chunk(rid: str, tokens: int, offline: bool = False) -> ScheduledChunk:
    return ScheduledChunk(rid, list(range(tokens)), 0, [0], None, offline)


def batch(*chunks: ScheduledChunk, pred: float | None = None, alone: float | None = None):
    return ScheduledBatch(chunks=chunks, predicted_s=pred, online_predicted_s=alone)


def online_request(rid: str, outputs: int, finished: bool = False) -> Request:
    r = Request(rid, [1, 2, 3], SamplingParams(max_tokens=outputs))
    r.token_ids += [7] * outputs
    if finished:
        r.move_to(RequestStatus.RUNNING)
        r.move_to(RequestStatus.FINISHED_LENGTH)
    return r


def test_offline_share_of_a_step():
    assert offline_share(batch(chunk("a", 1))) == 0.0  # online only
    assert offline_share(batch(chunk("b", 9, offline=True))) == 1.0  # offline only
    assert offline_share(batch(chunk("a", 1)), stopped=True) == 1.0  # a stop: waited for
    mixed = batch(chunk("a", 1), chunk("b", 1, offline=True), pred=0.050, alone=0.040)
    assert offline_share(mixed) == pytest.approx(0.2)
    # without predictions: by tokens
    assert offline_share(batch(chunk("a", 1), chunk("b", 3, offline=True))) == 0.75


def test_relative_ttft_counts_only_what_offline_work_added():
    slo = Slo(slack=0.1)
    c = ObjectiveCounter()
    c.watch("a", arrived=10.0, own_prefill_s=0.2)  # allowed: 0.02 s of offline work
    c.watch("b", arrived=10.0, own_prefill_s=0.2)
    # an offline step from 9.99 to 10.015: 0.015 s of it after the arrivals
    c.on_step(batch(chunk("x", 50, offline=True)), 9.99, 10.015, [], slo)
    # "a"'s prefill alone: its first token; the step is online work, adds nothing
    c.on_step(batch(chunk("a", 3)), 10.015, 10.2, [online_request("a", 1)], slo)
    assert c.counts()["ttft"] == (1, 0)
    # another offline step (a stopped one) before "b" starts: 0.015 + 0.01 > 0.02
    c.on_step(batch(chunk("x", 50, offline=True)), 10.2, 10.21, [], slo, stopped=True)
    c.on_step(batch(chunk("b", 3)), 10.21, 10.4, [online_request("b", 1)], slo)
    assert c.counts()["ttft"] == (1, 1)
    assert c.counts()["tpot"] == (0, 0)  # neither finished


def test_relative_tpot_compares_offline_time_with_the_slack_of_the_decode_time():
    slo = Slo(slack=0.05)
    c = ObjectiveCounter()
    c.watch("a", arrived=0.0, own_prefill_s=0.1)
    c.on_step(batch(chunk("a", 3)), 0.0, 0.1, [online_request("a", 1)], slo)
    # ten decode steps of 0.1 s with 4% offline work in each: within the 5% slack
    t = 0.1
    for i in range(10):
        step = batch(chunk("a", 1), chunk("x", 1, offline=True), pred=0.1, alone=0.096)
        c.on_step(step, t, t + 0.1, [online_request("a", 2 + i, finished=i == 9)], slo)
        t += 0.1
    assert c.counts()["tpot"] == (1, 0)
    # the same with one offline-only step of 0.1 s in between: 0.14 s > 5% of 0.96 s
    c.watch("b", arrived=t, own_prefill_s=0.1)
    c.on_step(batch(chunk("b", 3)), t, t + 0.1, [online_request("b", 1)], slo)
    t += 0.1
    c.on_step(batch(chunk("x", 64, offline=True)), t, t + 0.1, [], slo)
    t += 0.1
    for i in range(10):
        step = batch(chunk("b", 1), chunk("x", 1, offline=True), pred=0.1, alone=0.096)
        c.on_step(step, t, t + 0.1, [online_request("b", 2 + i, finished=i == 9)], slo)
        t += 0.1
    assert c.counts() == {"ttft": (2, 0), "tpot": (1, 1)}


def test_absolute_objectives_compare_the_times_themselves():
    slo = Slo(tpot=0.05, ttft=0.5)
    c = ObjectiveCounter()
    c.watch("fast", 0.0, 0.0)
    c.watch("slow", 0.0, 0.0)
    c.on_step(batch(chunk("fast", 3)), 0.0, 0.4, [online_request("fast", 1)], slo)
    c.on_step(batch(chunk("slow", 3)), 0.4, 0.6, [online_request("slow", 1)], slo)
    # "fast": 4 tokens after its first in 0.2 s (0.05 each); "slow": in 0.24 s
    c.on_step(batch(chunk("fast", 1)), 0.4, 0.6, [online_request("fast", 5, True)], slo)
    c.on_step(batch(chunk("slow", 1)), 0.6, 0.84, [online_request("slow", 5, True)], slo)
    assert c.counts() == {"ttft": (1, 1), "tpot": (1, 1)}


def test_aborted_and_one_token_requests_count_no_tpot():
    slo = Slo(tpot=1.0, ttft=1.0)
    c = ObjectiveCounter()
    c.watch("one", 0.0, 0.0)
    c.watch("gone", 0.0, 0.0)
    c.on_step(batch(chunk("one", 3)), 0.0, 0.1, [online_request("one", 1, True)], slo)
    c.forget("gone")
    c.on_step(batch(chunk("gone", 3)), 0.1, 0.2, [online_request("gone", 1)], slo)
    assert c.counts() == {"ttft": (1, 0), "tpot": (0, 0)}
    # without objectives (a policy that has none) nothing is counted
    c.watch("free", 0.0, 0.0)
    c.on_step(batch(chunk("free", 3)), 0.0, 0.1, [online_request("free", 1, True)], None)
    assert c.counts() == {"ttft": (1, 0), "tpot": (0, 0)}


def record(b: ScheduledBatch, plan: float, run: float, apply: float, stopped: bool = False):
    return StepRecord(b, 0.0, plan, run, apply, stopped_at_layer=3 if stopped else None)


def test_harvest_counter_sorts_steps_by_kind():
    h = HarvestCounter()
    h.on_step_end(record(batch(chunk("a", 1), chunk("x", 2, offline=True)), 0.001, 0.02, 0.001))
    h.on_step_end(record(batch(chunk("x", 100, offline=True)), 0.002, 0.2, 0.008))
    h.on_step_end(record(batch(chunk("y", 50, offline=True)), 0.0, 0.05, 0.0, stopped=True))
    h.on_step_end(record(batch(chunk("y", 50, offline=True)), 0.0, 0.06, 0.0))  # resumed
    s = h.stats()
    assert s.online_busy_s == pytest.approx(0.022)
    assert s.offline_only_busy_s == pytest.approx(0.21 + 0.05 + 0.06)
    assert s.offline_only_tokens == 150  # the stopped step's tokens count once, resumed
    assert s.offline_computed_tokens == 152


def test_the_engine_counts_every_online_sequence_and_every_offline_token(
    tiny_llama_dir, linear_profile
):
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", policy="conserve", latency_profile=linear_profile
    )
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(3):
        eng.add_request(f"on{i}", list(range(100, 120 + i)), params)
    eng.add_request(
        "two", list(range(200, 210)), SamplingParams(n=2, max_tokens=4, seed=1, ignore_eos=True)
    )
    for i in range(2):
        eng.add_request(
            f"off{i}", list(range(300 + 50 * i, 340 + 50 * i)), params, RequestClass.OFFLINE
        )
    eng.add_request("gone", list(range(400, 410)), params)
    eng.abort("gone")
    while eng.has_unfinished():
        eng.step()
    st = eng.stats()
    ttft, tpot = st.objectives["ttft"], st.objectives["tpot"]
    assert sum(ttft) == sum(tpot) == 5  # three requests, and two sequences of "two"
    h = st.harvest
    # offline: two prompts of 40 and five more tokens each, nothing recomputed
    assert st.tokens_recomputed == 0
    assert h.offline_computed_tokens == 2 * (40 + 5)
    assert 0 < h.offline_only_tokens <= h.offline_computed_tokens
    assert h.online_busy_s > 0 and h.offline_only_busy_s > 0
    assert h.online_busy_s + h.offline_only_busy_s >= st.busy_s
    eng.check_integrity()
