"""Co-serving on the real engine: an offline request stopped between layers any number of
times produces exactly the greedy tokens of an uninterrupted run, next to online requests; the
preempted steps commit nothing and leave no KV behind."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from conserve import LLM, SamplingParams
from conserve.engine.latency import FEATURES
from conserve.engine.request import RequestClass
from conserve.engine.stats import StepObserver, StepRecord

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def conserve_llm(folder, profile, **kw) -> LLM:
    return LLM(
        str(folder),
        dtype="float32",
        policy="conserve",
        latency_profile=profile,
        tpot_slo=0.01,
        ttft_slo=1.0,
        **kw,
    )


def stop_randomly(engine, rng: random.Random, p: float) -> list[int]:
    """Make every preemptible step stop at each safepoint with probability p."""
    execute = engine.runner.execute
    stopped: list[int] = []

    def wrapped(batch, stop=None):
        if stop is None:
            return execute(batch)

        def maybe() -> bool:
            if rng.random() < p:
                stopped.append(1)
                return True
            return False

        return execute(batch, maybe)

    engine.runner.execute = wrapped
    return stopped


def test_layer_wise_preemption_keeps_greedy_tokens(
    tiny_llama_dir, tiny_llama_reference, linear_profile
):
    prompts, ref, _ = tiny_llama_reference
    llm = conserve_llm(tiny_llama_dir, linear_profile, max_prefill_chunk=96)
    eng = llm.engine
    stopped = stop_randomly(eng, random.Random(3), 0.2)
    # offline: all prompts; online: the two shortest again, joining mid-run
    for i, p in enumerate(prompts):
        eng.add_request(f"off{i}", p, GREEDY, RequestClass.OFFLINE)
    outs = {}
    steps = 0
    while eng.has_unfinished():
        if steps == 5:
            eng.add_request("on0", prompts[0], GREEDY, RequestClass.ONLINE)
            eng.add_request("on1", prompts[1], GREEDY, RequestClass.ONLINE)
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        steps += 1
        eng.scheduler.check_integrity()
    assert len(stopped) >= 10 and eng.num_layer_preemptions == len(stopped)
    assert [outs[f"off{i}"] for i in range(len(prompts))] == ref
    assert outs["on0"] == ref[0] and outs["on1"] == ref[1]
    eng.check_integrity()
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.pool.num_blocks


@pytest.mark.parametrize("host_kv_gb", [0.0, 0.05])
def test_preemption_under_memory_pressure_keeps_greedy_tokens(
    tiny_llama_dir, tiny_llama_reference, linear_profile, host_kv_gb
):
    """Online requests arriving into a full pool preempt offline ones, which finish with the
    uninterrupted tokens: recomputed (no host tier) or restored from their checkpoints."""
    prompts, ref, _ = tiny_llama_reference
    llm = conserve_llm(
        tiny_llama_dir,
        linear_profile,
        num_blocks=60,
        block_size=16,
        host_kv_gb=host_kv_gb,
        enable_prefix_caching=False,  # so resumed requests cannot lean on cached blocks
    )
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"off{i}", p, GREEDY, RequestClass.OFFLINE)
    outs = {}
    steps = 0
    while eng.has_unfinished():
        if steps in (3, 40, 90):
            eng.add_request(f"on{steps}", prompts[2], GREEDY, RequestClass.ONLINE)
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
        steps += 1
    assert eng.scheduler.preemptions_by_class[RequestClass.OFFLINE] > 0
    assert eng.scheduler.preemptions_by_class[RequestClass.ONLINE] == 0
    assert [outs[f"off{i}"] for i in range(len(prompts))] == ref
    assert all(outs[f"on{s}"] == ref[2] for s in (3, 40, 90))
    sched = eng.scheduler
    if host_kv_gb:
        assert sched.num_pauses > 0 and sched.tokens_restored > 0
        assert sched.host.blocks_restored * 16 == sched.tokens_restored
    else:
        assert sched.host is None and sched.tokens_restored == 0
    eng.check_integrity()


class Stops(StepObserver):
    """(seconds from the stop request, layers run) of every stopped step."""

    def __init__(self, engine) -> None:
        self.stops: list[tuple[float | None, int]] = []
        engine.add_observer(self)

    def on_step_end(self, record: StepRecord) -> None:
        if record.stopped:
            self.stops.append((record.stop_wait_s, record.stopped_at_layer))


def slow_layers(eng, seconds: float = 0.05) -> None:
    """Make every layer of the engine's model sleep `seconds` before it runs (before its
    attention's projection, which the runner calls on every path through a layer)."""
    for layer in eng.runner.model.layers:
        fwd = layer.project

        def slow(*a, _fwd=fwd, **k):
            time.sleep(seconds)
            return _fwd(*a, **k)

        layer.project = slow


def test_request_stop_from_another_thread_stops_a_long_offline_step(tiny_llama_dir, linear_profile):
    """The monitor path: while an offline-only step runs, `request_stop` (called the way the
    engine core's pipe thread calls it) stops it at the next safepoint."""
    llm = conserve_llm(tiny_llama_dir, linear_profile, max_num_batched_tokens=2048)
    eng = llm.engine
    stops = Stops(eng)
    slow_layers(eng)  # so the step outlives the call from the other thread
    eng.add_request("off", list(range(300, 1800)), GREEDY, RequestClass.OFFLINE)
    eng.latency.coef[:] = 0
    eng.latency.coef[FEATURES.index("const")] = 10.0  # predicted: far beyond any SLO
    results = []

    def monitor() -> None:
        deadline = time.monotonic() + 30
        while eng._current is None and time.monotonic() < deadline:
            time.sleep(0.001)  # wait for the step to start
        results.append(eng.request_stop(16))

    t = threading.Thread(target=monitor)
    t.start()
    assert eng.step() == []  # stopped: nothing produced
    t.join()
    assert results == [True]
    assert eng.num_layer_preemptions == 1
    [(wait, layer)] = stops.stops
    # (a 1500-token step has safepoints inside its layers too: it may stop inside the first)
    assert 0 <= layer < len(eng.runner.model.layers) and wait < 0.5
    req = eng.scheduler.requests["off"]
    assert req.num_computed_tokens == 0  # the preempted step committed nothing
    eng.latency.coef[FEATURES.index("const")] = 0.001  # now nothing asks for a stop
    eng.step()  # the next step is not stopped by the stale request
    assert eng.num_layer_preemptions == 1 and req.num_computed_tokens > 0
    eng.abort("off")
    eng.check_integrity()
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.pool.num_blocks


def test_request_stop_stops_a_step_that_overruns_its_prediction(tiny_llama_dir, linear_profile):
    """The latency model predicts 1 ms for a step that takes about 0.15 s (a loaded machine,
    a stale profile): once layers have run, the monitor extrapolates the remaining time from
    them instead of trusting the prediction, which says the step should be over already."""
    llm = conserve_llm(tiny_llama_dir, linear_profile, max_num_batched_tokens=2048)
    eng = llm.engine
    stops = Stops(eng)
    slow_layers(eng)
    eng.add_request("off", list(range(300, 800)), GREEDY, RequestClass.OFFLINE)
    eng.latency.coef[:] = 0
    eng.latency.coef[FEATURES.index("const")] = 0.001  # predicted: 1 ms
    results = []

    def monitor() -> None:
        deadline = time.monotonic() + 30
        while eng.runner.progress == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # wait until the first layer is done: the prediction has expired
        results.append(eng.request_stop(16))

    t = threading.Thread(target=monitor)
    t.start()
    assert eng.step() == []
    t.join()
    assert results == [True] and eng.num_layer_preemptions == 1
    # stopped at the next safepoint: inside layer 1 (500 rows: safepoints inside layers)
    assert stops.stops[0][1] == 1
    assert eng.runner.progress == 0.0  # reset between steps
    eng.abort("off")
    eng.check_integrity()


def test_an_arrival_between_steps_stops_the_next_offline_step(
    tiny_llama_dir, linear_profile, tmp_path
):
    """An online request announced while no step runs (the loop is applying the last step or
    planning the next) has not been taken in by the plan: the next offline step stops at its
    first safepoint instead of running in full. Once the loop takes the request in, steps
    are not stopped on its account any more. The step log records all of it."""
    log = tmp_path / "steps.jsonl"
    llm = conserve_llm(
        tiny_llama_dir, linear_profile, max_num_batched_tokens=2048, step_log=str(log)
    )
    eng = llm.engine
    stops = Stops(eng)
    eng.add_request("off", list(range(300, 1000)), GREEDY, RequestClass.OFFLINE)
    eng.latency.coef[:] = 0
    eng.latency.coef[FEATURES.index("const")] = 10.0  # predicted: far beyond any SLO
    assert eng.announce_online(16) is False  # nothing is running yet
    assert eng.step() == []
    assert eng.num_layer_preemptions == 1
    assert stops.stops[0][1] == 0  # at the first safepoint, before any layer ran
    assert eng.scheduler.requests["off"].num_computed_tokens == 0
    eng.online_received()
    eng.add_request("on", list(range(300, 316)), GREEDY, RequestClass.ONLINE)
    eng.step()  # the online prefill, with no offline prompt tokens beside it
    assert eng.num_layer_preemptions == 1
    assert eng.scheduler.requests["on"].num_computed_tokens == 16
    eng.abort("on")
    eng.step()  # offline alone again: nobody is waiting, so nothing stops it
    assert eng.num_layer_preemptions == 1
    assert eng.scheduler.requests["off"].num_computed_tokens > 0
    eng.abort("off")
    eng.check_integrity()
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    added = [r for r in recs if "added" in r]
    steps = [r for r in recs if "run_s" in r]
    assert [(r["added"], r["class"], r["prompt_len"]) for r in added] == [
        ("off", "offline", 700),
        ("on", "online", 16),
    ]
    assert [r["stopped_at_layer"] for r in steps] == [0, None, None]
    assert steps[0]["offline"] == [1, 700] and steps[0]["online"] == [0, 0]
    assert steps[1]["online"] == [1, 16] and steps[1]["online_prefill_ids"] == ["on"]
    assert steps[1]["offline"] == [0, 0]  # offline decodes only beside an online prefill
    assert all(r["t"] >= added[0]["t"] and r["run_s"] > 0 for r in steps)


def test_an_open_door_stops_offline_work_until_it_closes(
    tiny_llama_dir, linear_profile, monkeypatch
):
    """The HTTP server opens the door while it reads requests whose class it does not know
    yet: the engine treats that as an online arrival of unknown length (an offline step stops
    at its next safepoint, the loop is told to wait), until the door closes or DOOR_WAIT_S
    has passed; then the stopped step resumes and nothing is lost."""
    from conserve.engine import engine as engine_mod

    # the door's time limit is moved past below, never waited for (a slow machine cannot
    # outlast it between two lines)
    monkeypatch.setattr(engine_mod, "DOOR_WAIT_S", 3600.0)
    llm = conserve_llm(tiny_llama_dir, linear_profile, max_num_batched_tokens=2048)
    eng = llm.engine
    stops = Stops(eng)
    eng.add_request("off", list(range(300, 1000)), GREEDY, RequestClass.OFFLINE)
    eng.latency.coef[:] = 0
    eng.latency.coef[FEATURES.index("const")] = 10.0  # predicted: far beyond any SLO
    assert eng.door_wait() == 0.0 and not eng.online_pending()
    eng.door(True)
    assert 0 < eng.door_wait() <= engine_mod.DOOR_WAIT_S and eng.online_pending()
    assert eng.step() == []
    assert eng.num_layer_preemptions == 1 and stops.stops[0][1] == 0
    assert eng.scheduler.requests["off"].num_computed_tokens == 0
    eng.door(False)  # it was an offline request (or a bad one): the step resumes in full
    assert eng.door_wait() == 0.0 and not eng.online_pending()
    eng.step()
    assert eng.num_layer_preemptions == 1
    assert eng.scheduler.requests["off"].num_computed_tokens == 700
    # a door left open longer than DOOR_WAIT_S no longer stops anything
    eng.door(True)
    eng._door_opened -= engine_mod.DOOR_WAIT_S
    assert eng.door_wait() == 0.0 and not eng.online_pending()
    eng.step()
    assert eng.num_layer_preemptions == 1
    # with online work ready the loop does not wait at the door
    eng.add_request("on", list(range(300, 316)), GREEDY, RequestClass.ONLINE)
    eng.door(True)
    assert eng.door_wait() == 0.0
    eng.door(False)
    # a running step with online work in it is not stopped by the door (the request may be
    # offline); the same step would be by an online arrival, and one without online work is
    from conserve.engine.engine import _Step

    eng._current = step = _Step(time.monotonic(), 10.0, online=5.0)  # half online work
    eng.door(True)
    assert not step.stop()
    assert eng.request_stop(16) is True and step.stop()
    eng._current = step = _Step(time.monotonic(), 10.0)
    eng.door(True)
    assert step.stop()
    eng._current = None
    eng.door(True)  # an online request classified: the server leaves the door to it ...
    assert eng.online_pending()
    eng.announce_online(16)  # ... and its arrival closes it
    eng.online_received()
    assert eng._door_opened is None
    while eng.has_unfinished():
        eng.step()
    eng.check_integrity()


def test_request_stop_stops_a_step_past_its_predicted_end(tiny_llama_dir, linear_profile):
    """With no layer done since the step started (or its layers done, its LM head running),
    the monitor has only the prediction: a step already past its predicted end has an unknown
    time left and is stopped; one predicted to end within the arrival's slack is not."""
    from conserve.engine.engine import _Step

    llm = LLM(
        str(tiny_llama_dir),
        dtype="float32",
        policy="conserve",
        latency_profile=linear_profile,
        slo_slack=0.2,  # relative objectives: an arrival may wait 20% of its own prefill
    )
    eng = llm.engine
    assert eng.slo.ttft is None and eng.runner.progress == 0.0
    eng.latency.coef[:] = 0
    eng.latency.coef[FEATURES.index("const")] = 1.0  # the arrival's own prefill: 1 s
    now = time.monotonic()
    eng._current = _Step(now - 0.3, 0.2)  # predicted to end 0.1 s ago
    assert eng.request_stop(16) is True
    eng._current = _Step(now, 10.0)  # 10 s left by the prediction
    assert eng.request_stop(16) is True
    eng._current = _Step(time.monotonic(), 0.1)  # within the slack (20% of 1 s)
    assert eng.request_stop(16) is False
    eng._current = None
