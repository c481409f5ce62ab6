"""Scheduling policy objects on their own: plain objects, a fake latency model and made-up
times; no scheduler except where the scheduler's side of a contract is the point. The last
tests switch the policy of a real engine (tiny model)."""

from __future__ import annotations

import pytest

from conserve.config import POLICIES, SchedulerConfig
from conserve.engine.batch import ScheduledBatch, ScheduledChunk
from conserve.engine.latency import BatchShape
from conserve.engine.policy import (
    BUDGET_MIN_STEPS,
    BUDGET_WINDOW,
    NO_LIMIT,
    ONLINE_RECENT_S,
    POLICY_CLASSES,
    ConservePolicy,
    FcfsPolicy,
    OfflineBudget,
    OnlineOnlyPolicy,
    PriorityPolicy,
    Slo,
    make_policy,
    policy_class,
)
from conserve.engine.request import Request, RequestClass, RequestStatus
from conserve.engine.scheduler import Scheduler
from conserve.kv.manager import KVCacheManager
from conserve.sampling.params import SamplingParams

ON, OFF = RequestClass.ONLINE, RequestClass.OFFLINE


class FakeLatency:
    """Predicts 10 ms + 1 ms per token; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, shape: BatchShape) -> float:
        self.calls += 1
        return 0.010 + 0.001 * shape.tokens


def request(rid: str, klass: RequestClass, running: bool = False, outputs: int = 0) -> Request:
    r = Request(rid, [1, 2, 3], SamplingParams(max_tokens=50), klass)
    r.token_ids += [7] * outputs
    if running:
        r.move_to(RequestStatus.RUNNING)
    return r


SLO = Slo(tpot=0.1, ttft=1.0, margin=0.1)


def conserve(slo: Slo | None = SLO, offline_step_s: float | None = None) -> ConservePolicy:
    return ConservePolicy(FakeLatency(), slo, offline_step_s)


# -- registry and factory ---------------------------------------------------------------------


def test_the_registry_has_exactly_the_config_s_policy_names():
    assert tuple(POLICY_CLASSES) == POLICIES
    for name in POLICIES:
        policy = make_policy(name)
        assert policy.name == name and type(policy) is policy_class(name)
    with pytest.raises(ValueError, match="policy must be one of"):
        make_policy("lottery")


def test_make_policy_passes_the_latency_model_to_every_policy_and_the_rest_to_conserve():
    latency = FakeLatency()
    slo = Slo(0.05, 0.5)
    for name in POLICIES:
        policy = make_policy(name, latency, slo, 0.2)
        assert policy.latency is latency
        assert policy.slo == (slo if name == "conserve" else None)
    assert make_policy("conserve", latency, slo, 0.2).offline_step_limit == 0.2


def test_what_each_policy_needs_from_the_engine():
    needs = {n: (c.uses_latency_model, c.uses_host_tier) for n, c in POLICY_CLASSES.items()}
    assert needs == {
        "online-only": (False, False),
        "fcfs": (False, False),
        "priority": (False, False),
        "conserve": (True, True),
    }


# -- order, offline admission, preemptible ----------------------------------------------------


def test_queue_order_and_whether_offline_runs():
    assert not FcfsPolicy.online_first
    assert PriorityPolicy.online_first and OnlineOnlyPolicy.online_first
    assert ConservePolicy.online_first
    online_only = OnlineOnlyPolicy()
    assert not online_only.runs_offline(online_present=True)
    assert online_only.runs_offline(online_present=False)
    for policy in (FcfsPolicy(), PriorityPolicy(), conserve()):
        assert policy.runs_offline(True) and policy.runs_offline(False)


def test_only_conserve_steps_with_offline_work_are_preemptible():
    for policy in (FcfsPolicy(), PriorityPolicy(), OnlineOnlyPolicy()):
        assert not policy.preemptible(0) and not policy.preemptible(3)
    assert conserve().preemptible(1) and not conserve().preemptible(0)


def test_policies_without_a_latency_budget_set_no_limits():
    running = [request("on", ON, running=True, outputs=5)]
    for policy in (FcfsPolicy(), PriorityPolicy(), OnlineOnlyPolicy()):
        assert policy.offline_budget(running, True, True, 5.0) == NO_LIMIT
        assert policy.prediction_scale == 1.0
        policy.note_online(5.0)  # accepted, no effect
        policy.observe_step(ScheduledBatch(predicted_s=0.1, online_budget=True), 0.5)
        assert policy.prediction_scale == 1.0


# -- victims: preemption for blocks and seats -------------------------------------------------


def _candidates() -> list[Request]:
    """Running requests, oldest first: offline a, online b, offline c, online d."""
    return [
        request("a", OFF, running=True),
        request("b", ON, running=True),
        request("c", OFF, running=True),
        request("d", ON, running=True),
    ]


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def test_fcfs_victims_are_the_newest_running_requests_and_waiting_ones_never_preempt():
    cands = _candidates()
    fcfs = FcfsPolicy()
    assert ids(fcfs.victims(cands[1], cands)) == ["d", "c", "b", "a"]  # itself included
    assert fcfs.victims(request("w", ON), cands) == []
    assert fcfs.victims(request("w", OFF), cands) == []


@pytest.mark.parametrize("name", ["priority", "online-only", "conserve"])
def test_class_policies_preempt_the_newest_offline_requests_first(name):
    cands = _candidates()
    policy = make_policy(name)
    # a running online request: offline newest first, then online newest first
    assert ids(policy.victims(cands[1], cands)) == ["c", "a", "d", "b"]
    # a running offline request: offline ones only (itself among them)
    assert ids(policy.victims(cands[0], cands)) == ["c", "a"]
    # a waiting online request takes blocks or a seat from offline ones only
    waiting = request("w", ON)
    assert ids(policy.victims(waiting, cands)) == ["c", "a"]
    preempted = request("p", ON, running=True)
    preempted.move_to(RequestStatus.PREEMPTED)  # re-admission counts as waiting
    assert ids(policy.victims(preempted, cands)) == ["c", "a"]
    # a waiting offline request waits
    assert policy.victims(request("w2", OFF), cands) == []
    # nobody offline left: an online request waits too
    online = [c for c in cands if c.request_class is ON]
    assert policy.victims(waiting, online) == []


# -- conserve: the latency budget -------------------------------------------------------------


def test_conserve_tpot_budget_is_the_slo_minus_the_margin_scaled_by_prediction_error():
    policy = conserve()
    assert policy.tpot_budget([], now=3.0) == pytest.approx(0.09)
    policy.prediction_scale = 1.5
    assert policy.tpot_budget([], now=3.0) == pytest.approx(0.06)
    assert conserve(slo=None).tpot_budget([], 3.0) is None
    no_model = ConservePolicy(None, Slo(0.1, 1.0))
    assert no_model.tpot_budget([], 3.0) is None


def test_conserve_gives_an_online_request_that_is_behind_its_time_back():
    policy = conserve()
    on = request("on", ON, running=True, outputs=3)
    on.first_token_time = 10.0
    off = request("off", OFF, running=True, outputs=10)
    off.first_token_time = 0.0  # offline requests have no TPOT to keep
    # 3 tokens out, 0.2 s since the first: 3 x 0.09 - 0.2 = 0.07 s, less than the budget
    assert policy.tpot_budget([on, off], now=10.2) == pytest.approx(0.07)
    assert policy.tpot_budget([on, off], now=10.1) == pytest.approx(0.09)  # ahead: capped
    assert policy.tpot_budget([on, off], now=10.5) == 0.0  # far behind: no offline work
    waiting_for_first = request("new", ON, running=True)
    assert policy.tpot_budget([waiting_for_first], now=99.0) == pytest.approx(0.09)


def test_conserve_prediction_scale_is_a_high_quantile_of_recent_overruns():
    policy = conserve()
    for _ in range(7):
        policy.observe_budgeted(0.05, 0.1)
    assert policy.prediction_scale == 1.0  # fewer than 8 steps
    policy.observe_budgeted(0.05, 0.1)
    assert policy.prediction_scale == 2.0  # 2x over, the cap
    for _ in range(64):
        policy.observe_budgeted(0.05, 0.06)
    assert policy.prediction_scale == pytest.approx(1.2)  # the old steps left the window
    for _ in range(64):
        policy.observe_budgeted(0.05, 0.01)
    assert policy.prediction_scale == 1.0  # faster than predicted never enlarges it
    policy.observe_budgeted(0.0, 5.0)  # no prediction: ignored
    assert policy.prediction_scale == 1.0


def test_conserve_learns_only_from_steps_planned_under_the_online_budget():
    policy = conserve()
    for _ in range(8):
        policy.observe_step(ScheduledBatch(predicted_s=0.05, online_budget=False), 0.1)
        policy.observe_step(ScheduledBatch(predicted_s=None, online_budget=True), 0.1)
    assert policy.prediction_scale == 1.0
    for _ in range(8):
        policy.observe_step(ScheduledBatch(predicted_s=0.05, online_budget=True), 0.065)
    assert policy.prediction_scale == pytest.approx(1.3)


def test_conserve_offline_step_limit_is_configured_or_150_one_token_steps():
    assert conserve(offline_step_s=0.3).offline_step_limit == 0.3
    policy = conserve()
    assert policy.offline_step_limit == pytest.approx(1.65)  # 150 x (10 ms + 1 ms)
    assert policy.offline_step_limit == pytest.approx(1.65)
    assert policy.latency.calls == 1  # derived once
    assert ConservePolicy(None, None).offline_step_limit is None


def test_conserve_offline_budget_with_online_work_is_the_tpot_budget():
    policy = conserve()
    running = [request("on", ON, running=True)]
    budget = policy.offline_budget(running, online_present=True, online_prefill=False, now=1.0)
    assert budget == OfflineBudget(pytest.approx(0.09), online_budget=True)
    with_prefill = policy.offline_budget(running, True, online_prefill=True, now=1.0)
    assert with_prefill.decodes_only and with_prefill.online_budget


RELATIVE = Slo(None, None, slack=0.2)


def decodes(n: int) -> BatchShape:
    shape = BatchShape()
    for _ in range(n):
        shape.add(99, 1)
    return shape


def test_conserve_as_if_alone_budget_is_the_online_work_alone_plus_the_slack():
    policy = conserve(RELATIVE, offline_step_s=0.3)
    assert policy.relative and not conserve().relative
    running = [request("on", ON, running=True, outputs=3)]
    online = decodes(4)  # 10 ms + 4 ms alone
    budget = policy.offline_budget(running, True, False, now=1.0, online=online)
    # offline decodes only beside online work (small prompt chunks cost far more than their
    # tokens), up to the online work alone plus the slack
    assert budget == OfflineBudget(
        pytest.approx(0.014 * 1.2), online_budget=True, decodes_only=True
    )
    prefill = policy.offline_budget(running, True, True, now=1.0, online=online)
    assert prefill == OfflineBudget(0.0, online_budget=True, decodes_only=True)  # nothing
    # online work waits but none is planned in this step: an offline step, kept short
    policy.note_online(1.0)
    idle = policy.offline_budget(running, True, False, now=1.0, online=BatchShape())
    assert idle == OfflineBudget(0.3, decodes_first=True, min_prompt_s=0.075)
    # an absolute TPOT objective wins over the relative one
    mixed = conserve(Slo(0.1, None, slack=0.2))
    assert not mixed.relative
    assert mixed.offline_budget(running, True, False, 1.0, online).time_limit == pytest.approx(0.09)


def test_conserve_as_if_alone_corrects_mixed_steps_against_online_only_steps():
    policy = conserve(RELATIVE)
    on = ScheduledChunk("on", [1], 5, [0], None)
    off = ScheduledChunk("off", [1], 5, [1], None, offline=True)
    mixed = ScheduledBatch(chunks=[on, off], predicted_s=0.1, online_budget=True)
    alone = ScheduledBatch(chunks=[on], predicted_s=0.1, online_budget=True)
    for _ in range(BUDGET_MIN_STEPS - 1):
        policy.observe_step(mixed, 0.13)
    assert policy.prediction_scale == 1.0  # too few mixed steps yet
    policy.observe_step(mixed, 0.13)
    assert policy.prediction_scale == pytest.approx(1.3)  # no online-only steps: 1 for them
    for _ in range(BUDGET_MIN_STEPS):
        policy.observe_step(alone, 0.11)  # the model under-predicts everything by 10%
    policy.observe_step(mixed, 0.13)
    assert policy.prediction_scale == pytest.approx(1.3 / 1.1)  # only the mixed excess counts
    assert policy.relative_budget(decodes(4)) == pytest.approx(0.014 * 1.2 * 1.1 / 1.3)
    for _ in range(BUDGET_WINDOW):
        policy.observe_step(mixed, 0.05)  # faster than predicted never enlarges the budget
    assert policy.prediction_scale == 1.0


def test_stop_limit_relative_and_absolute():
    from conserve.engine.engine import stop_limit

    # relative: the arrival may wait the slack of its own prefill, plus what the online part
    # of the running step would have made it wait alone
    assert stop_limit(RELATIVE, own=0.1, online_left=0.0) == pytest.approx(0.02)
    assert stop_limit(RELATIVE, own=0.1, online_left=0.05) == pytest.approx(0.07)
    # absolute: what the TTFT objective leaves after its prefill, capped by the TPOT objective
    assert stop_limit(Slo(0.05, 1.0), own=0.3, online_left=0.0) == pytest.approx(0.05)
    assert stop_limit(Slo(0.5, 1.0), own=0.8, online_left=0.0) == pytest.approx(0.2)
    assert stop_limit(Slo(None, 1.0), own=0.8, online_left=0.0) == pytest.approx(0.2)
    assert stop_limit(None, own=0.1, online_left=0.0) == 0.0


def test_conserve_keeps_offline_steps_short_for_a_minute_after_online_work():
    policy = conserve(offline_step_s=0.2)
    assert policy.offline_budget([], False, False, now=5.0) == NO_LIMIT  # never seen online
    policy.note_online(100.0)
    short = policy.offline_budget([], False, False, now=100.0 + ONLINE_RECENT_S)
    assert short == OfflineBudget(0.2, decodes_first=True, min_prompt_s=0.05)
    # prompt chunks fill the step to the limit, or a quarter of it on top of long decodes
    assert short.prompt_limit(0.1) == 0.2
    assert short.prompt_limit(0.3) == pytest.approx(0.35)
    assert policy.offline_budget([], False, False, now=100.1 + ONLINE_RECENT_S) == NO_LIMIT
    assert conserve().short_offline_steps(0.0) is False
    no_limit = ConservePolicy(None, None)
    no_limit.note_online(1.0)
    assert not no_limit.short_offline_steps(1.0)  # no step limit to apply


# -- SLOs -------------------------------------------------------------------------------------


def test_slo_from_config_unset_targets_are_relative():
    relative = Slo.from_config(SchedulerConfig(slo_slack=0.25))
    assert relative == Slo(None, None, 0.1, 0.25) and relative.tpot_budget is None
    assert relative.describe() == "TTFT as if alone +25%, TPOT as if alone +25%"
    cfg = SchedulerConfig(tpot_slo=0.1, ttft_slo=2.0, slo_margin=0.2)
    assert Slo.from_config(cfg) == Slo(0.1, 2.0, 0.2)
    assert Slo(0.1, 2.0, 0.2).tpot_budget == pytest.approx(0.08)
    half = Slo.from_config(SchedulerConfig(ttft_slo=0.5))
    assert half.describe() == "TTFT 0.5 s, TPOT as if alone +5%"
    with pytest.raises(ValueError, match="slo_slack"):
        SchedulerConfig(slo_slack=-0.1)


# -- the scheduler's side ---------------------------------------------------------------------


def test_the_scheduler_changes_policy_only_while_empty():
    scheduler = Scheduler(SchedulerConfig(), KVCacheManager(16, 4), FcfsPolicy())
    scheduler.set_policy(PriorityPolicy())
    assert scheduler.policy.name == "priority"
    scheduler.add(request("r", OFF))
    with pytest.raises(RuntimeError):
        scheduler.set_policy(FcfsPolicy())
    assert scheduler.policy.name == "priority"


def test_the_scheduler_tells_conserve_when_online_work_arrives():
    now = [40.0]
    policy = conserve(offline_step_s=0.2)
    scheduler = Scheduler(SchedulerConfig(), KVCacheManager(16, 4), policy, clock=lambda: now[0])
    scheduler.add(request("off", OFF))
    assert not policy.short_offline_steps(now[0])
    scheduler.add(request("on", ON))
    now[0] += ONLINE_RECENT_S
    assert policy.short_offline_steps(now[0])


# -- the engine's policy switch ---------------------------------------------------------------


def test_engine_switches_policies_keeping_its_latency_model_and_slos(
    tiny_llama_dir, linear_profile
):
    from conserve import LLM

    llm = LLM(
        str(tiny_llama_dir),
        dtype="float32",
        policy="conserve",
        latency_profile=linear_profile,
        tpot_slo=0.05,
        ttft_slo=1.0,
        host_kv_gb=0.05,
    )
    eng = llm.engine
    first = eng.policy
    assert isinstance(first, ConservePolicy) and first.latency is eng.latency
    assert eng.slo == Slo(0.05, 1.0, 0.1) and eng.scheduler.host is not None
    assert eng.scheduler.host.checkpoint_free == 0.5  # in memory: only under pressure
    eng.set_policy("conserve")  # the policy in force: same object, same learned state
    assert eng.policy is first
    eng.set_policy("priority")
    assert isinstance(eng.policy, PriorityPolicy) and eng.policy.latency is eng.latency
    assert eng.slo is None and eng.config.scheduler.policy == "priority"
    assert eng.config.scheduler.tpot_slo == 0.05  # kept for a switch back
    eng.set_policy("conserve")
    assert eng.policy is not first and eng.slo == Slo(0.05, 1.0, 0.1)
    eng.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="no unfinished request"):
        eng.set_policy("fcfs")
    assert eng.policy.name == "conserve"
    eng.abort("r")
    with pytest.raises(ValueError, match="policy must be one of"):
        eng.set_policy("lottery")
    assert eng.policy.name == "conserve" and eng.config.scheduler.policy == "conserve"
    eng.check_integrity()


def test_engine_switching_to_conserve_loads_the_latency_model_with_relative_slos(
    tiny_llama_dir, linear_profile
):
    from conserve import LLM

    llm = LLM(str(tiny_llama_dir), dtype="float32", latency_profile=linear_profile)
    eng = llm.engine
    assert eng.policy.name == "fcfs" and eng.latency is None and eng.slo is None
    eng.set_policy("conserve")
    assert eng.latency is not None and eng.policy.latency is eng.latency
    assert eng.slo == Slo(None, None, 0.1, 0.05) and eng.policy.relative
    sc = eng.config.scheduler
    assert (sc.policy, sc.tpot_slo, sc.ttft_slo) == ("conserve", None, None)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    eng.check_integrity()
