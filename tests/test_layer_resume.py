"""A stopped offline step keeps what its finished layers computed: the runner resumes it from
the layer where it stopped, once the online work that stopped it is served. Tokens stay those
of an uninterrupted run; a stopped step whose requests lose their blocks meanwhile (aborted,
preempted) is dropped instead, and nothing leaks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conserve import LLM, SamplingParams
from conserve.engine.batch import IterationPreempted
from conserve.engine.request import RequestClass
from conserve.engine.stats import StepObserver, StepRecord

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
OFF, ON = RequestClass.OFFLINE, RequestClass.ONLINE


def conserve_llm(folder, profile, **kw) -> LLM:
    # small pools: the default (4 GiB of KV, 2 GiB of host tier) per engine adds up in one
    # test process
    kw = {"kv_cache_gb": 0.05, "host_kv_gb": 0.05} | kw
    return LLM(str(folder), dtype="float32", policy="conserve", latency_profile=profile, **kw)


class Log(StepObserver):
    def __init__(self, engine) -> None:
        self.records: list[StepRecord] = []
        engine.add_observer(self)

    def on_step_end(self, record: StepRecord) -> None:
        self.records.append(record)


def stop_next_at(engine, layer: int) -> None:
    """Stop the next preemptible step that starts from layer 0 at the safepoint before layer
    `layer` (once; the step's rows are too few for safepoints inside layers)."""
    execute = engine.runner.execute
    state = {"armed": True}

    def wrapped(batch, stop=None):
        if stop is None or not state["armed"]:
            return execute(batch, stop)
        state["armed"] = False
        seen = iter(range(1, 10_000))
        return execute(batch, lambda: next(seen) == layer + 1)

    engine.runner.execute = wrapped


def one_step_run_whole(folder, profile):
    """An offline step of 57 rows (two prompts), run once without a stop: the runner, the
    batch, its logits and the K cache it wrote; the cache is then put back as it was before,
    so that the step can run again."""
    eng = conserve_llm(folder, profile).engine
    eng.add_request("a", list(range(300, 340)), GREEDY, OFF)
    eng.add_request("b", list(range(500, 517)), GREEDY, OFF)
    batch = eng.scheduler.schedule()
    runner = eng.runner
    before_k = [t.clone() for t in runner.kv.k]
    logits, _ = runner.forward(batch)
    whole_k = [t.clone() for t in runner.kv.k]
    for t, b in zip(runner.kv.k, before_k, strict=True):
        t.copy_(b)
    return runner, batch, logits, whole_k


def test_runner_resume_gives_the_uninterrupted_result(tiny_llama_dir, linear_profile):
    """Stopped after 2 layers and resumed: the same logits, bit for bit (float32), and the
    same KV cache, as the step run in one go."""
    runner, batch, logits, whole_k = one_step_run_whole(tiny_llama_dir, linear_profile)
    kv = runner.kv
    calls = iter(range(1, 100))
    with pytest.raises(IterationPreempted) as stopped:
        # safepoints before layers 0, 1, 2: the third
        runner.forward(batch, lambda: next(calls) == 3)
    assert stopped.value.layer == 2 and stopped.value.continuation is not None
    assert runner.progress == 0.0
    with torch.inference_mode():
        resumed_logits, _ = runner._logits(runner._layers(stopped.value.continuation, None))
    assert torch.equal(logits, resumed_logits)
    assert all(torch.equal(a, b) for a, b in zip(kv.k, whole_k, strict=True))


# A 57-row step of two prompts with `sublayer_rows` 16 has four safepoints in each layer: before
# it, inside its attention before each prompt's part (the first part, the K/V write, runs
# after the projection), and between its attention and feed-forward halves.
INSIDE = {
    6: (1, False, 1),  # layer 1, attention begun, one part done (K/V written)
    7: (1, False, 2),  # layer 1, the first prompt's attention done too
    8: (1, True, None),  # layer 1, attention half done
}


def where(p) -> tuple[int, bool, int]:
    """How far a pass has come, in the order its parts run."""
    return p.layer, p.attended, p.call.done if p.call is not None else 0


@pytest.mark.parametrize("at", sorted(INSIDE))
def test_a_step_stopped_inside_a_layer_resumes_where_it_stopped(tiny_llama_dir, linear_profile, at):
    """A step of at least `sublayer_rows` rows has safepoints inside each layer: between the
    parts of its attention and between its halves. Stopped there and resumed, it gives the
    logits and the KV of the step run without a stop, bit for bit (float32); the resumed pass
    runs one part at least before it honours a stop again."""
    runner, batch, logits, whole_k = one_step_run_whole(tiny_llama_dir, linear_profile)
    kv = runner.kv
    runner.sublayer_rows = 16
    calls = iter(range(1, 100))
    with pytest.raises(IterationPreempted) as stopped:
        runner.forward(batch, lambda: next(calls) == at)
    p = stopped.value.continuation
    layer, attended, parts = INSIDE[at]
    assert stopped.value.layer == layer and (p.layer, p.attended) == (layer, attended)
    assert (p.call.done if p.call is not None else None) == parts
    before = where(p)  # the pass is advanced in place
    with torch.inference_mode():
        # a stop asked at every safepoint: the resumed pass still moves on by one part
        with pytest.raises(IterationPreempted) as again:
            runner._layers(p, lambda: True)
        q = again.value.continuation
        assert where(q) > before
        resumed_logits, _ = runner._logits(runner._layers(q, None))
    assert torch.equal(logits, resumed_logits)
    assert all(torch.equal(a, b) for a, b in zip(kv.k, whole_k, strict=True))


# With `feed_forward_slice_rows` 20 as well, the 57-row step's feed-forward half runs in three
# slices (20, 20, 17 rows) with a safepoint before each: six safepoints per layer, the first
# slice's being the one between the halves.
IN_FEED_FORWARD = {11: 20, 12: 40}  # layer 1: rows of its feed-forward half done


@pytest.mark.parametrize("at", sorted(IN_FEED_FORWARD))
def test_a_step_stopped_inside_its_feed_forward_half_resumes_there(
    tiny_llama_dir, linear_profile, at
):
    """A step with safepoints inside its layers computes its feed-forward half in row slices
    with a safepoint before each. Stopped between two slices and resumed, it computes the rows
    left and gives the logits and KV of the same step run without a stop, bit for bit."""
    runner, batch, _, _ = one_step_run_whole(tiny_llama_dir, linear_profile)
    kv = runner.kv
    runner.sublayer_rows, runner.feed_forward_slice_rows = 16, 20
    k0, v0 = [t.clone() for t in kv.k], [t.clone() for t in kv.v]
    n_layers = len(runner.model.layers)
    calls = iter(range(1, 10_000))
    whole, _ = runner.forward(batch, lambda: next(calls) < 0)  # every safepoint, no stop
    assert next(calls) == 6 * n_layers + 1  # six a layer were asked
    whole_k = [t.clone() for t in kv.k]
    restore(runner, k0, v0)
    calls = iter(range(1, 100))
    with pytest.raises(IterationPreempted) as stopped:
        runner.forward(batch, lambda: next(calls) == at)
    p = stopped.value.continuation
    assert (p.layer, p.attended, p.ff_row) == (1, True, IN_FEED_FORWARD[at])
    with torch.inference_mode():
        with pytest.raises(IterationPreempted) as again:  # one slice at least, then a stop
            runner._layers(p, lambda: True)
        q = again.value.continuation
        assert (q.layer, q.ff_row) in {(1, IN_FEED_FORWARD[at] + 20), (2, 0)}
        resumed, _ = runner._logits(runner._layers(q, None))
    assert torch.equal(whole, resumed)
    assert all(torch.equal(a, b) for a, b in zip(kv.k, whole_k, strict=True))


def restore(runner, k_before, v_before) -> None:
    for t, b in zip(runner.kv.k, k_before, strict=True):
        t.copy_(b)
    for t, b in zip(runner.kv.v, v_before, strict=True):
        t.copy_(b)


def test_a_step_stopped_after_its_layers_keeps_the_rows_it_sampled(
    tiny_llama_dir, linear_profile, monkeypatch
):
    """After the last layer, an offline step computes its LM head and samples a slice of rows
    at a time, with a safepoint before each slice. Stopped there, it keeps the rows sampled so
    far; resumed, it runs one slice at least before it honours a stop again, and ends with the
    tokens of the step run without a stop. A step with online work is not stopped there."""
    import conserve.engine.runner as runner_mod

    monkeypatch.setattr(runner_mod, "LOGITS_SLICE_ROWS", 1)  # two sampling rows: two slices
    runner, batch, _, _ = one_step_run_whole(tiny_llama_dir, linear_profile)
    n_layers = len(runner.model.layers)
    k0, v0 = [t.clone() for t in runner.kv.k], [t.clone() for t in runner.kv.v]
    whole = runner.execute(batch, lambda: False).sampled
    assert len(whole) == 2
    restore(runner, k0, v0)
    calls = iter(range(1, 1000))
    with pytest.raises(IterationPreempted) as stopped:
        # a safepoint before each layer, then the first before the LM head
        runner.execute(batch, lambda: next(calls) == n_layers + 1)
    p = stopped.value.continuation
    assert stopped.value.layer == n_layers and p.layer == n_layers and p.sampled == []
    with pytest.raises(IterationPreempted) as again:
        runner.resume(p, lambda: True)  # the first slice runs, the second waits
    assert again.value.continuation is p and len(p.sampled) == 1
    assert runner.resume(p, lambda: False).sampled == whole
    # the same step with an online chunk in it: never stopped after its layers
    restore(runner, k0, v0)
    chunks = list(batch.chunks)
    chunks[0] = dataclasses.replace(chunks[0], offline=False)
    mixed = dataclasses.replace(batch, chunks=chunks)
    calls = iter(range(1, 1000))
    assert runner.execute(mixed, lambda: next(calls) > n_layers).sampled == whole


def test_a_stopped_offline_step_resumes_after_the_online_work(
    tiny_llama_dir, tiny_llama_reference, linear_profile
):
    prompts, ref, _ = tiny_llama_reference
    llm = conserve_llm(tiny_llama_dir, linear_profile, max_num_batched_tokens=4096)
    eng = llm.engine
    log = Log(eng)
    n_layers = len(eng.runner.model.layers)
    for i, p in enumerate(prompts[:4]):
        eng.add_request(f"off{i}", p, GREEDY, OFF)
    stop_next_at(eng, 2)
    assert eng.step() == []  # the offline prefill stopped before layer 2
    first = log.records[-1]
    assert first.stopped_at_layer == 2 and first.kept
    held = {c.request_id for c in first.batch.chunks}
    assert eng.scheduler.held == held
    eng.add_request("on", prompts[5], GREEDY, ON)
    outs = {}
    while eng.scheduler.requests["on"].num_output_tokens < 3:
        for o in eng.step():
            outs[o.request_id] = o
        rec = log.records[-1]
        # online steps leave the held requests alone
        assert not held & {c.request_id for c in rec.batch.chunks}
        assert rec.resumed_from_layer is None
    eng.abort("on")
    eng.step()  # no online work left: the stopped step resumes from layer 2
    resumed = log.records[-1]
    assert resumed.resumed_from_layer == 2 and resumed.batch is first.batch
    assert eng.num_layer_resumes == 1 and eng.num_layer_drops == 0 and not eng.scheduler.held
    assert eng.stats().num_layer_resumes == 1
    assert 1 < first.stopped_at_layer < n_layers
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert [outs[f"off{i}"].outputs[0].token_ids for i in range(4)] == [r[:24] for r in ref[:4]]
    eng.check_integrity()
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.pool.num_blocks


def test_a_stopped_step_whose_request_is_aborted_is_dropped(
    tiny_llama_dir, tiny_llama_reference, linear_profile
):
    """Aborting one request of a held step frees blocks the step would write to: the step is
    dropped at once, and the other request computes its tokens again, unchanged."""
    prompts, ref, _ = tiny_llama_reference
    llm = conserve_llm(tiny_llama_dir, linear_profile, max_num_batched_tokens=4096)
    eng = llm.engine
    eng.add_request("keep", prompts[0], GREEDY, OFF)
    eng.add_request("gone", prompts[1], GREEDY, OFF)
    stop_next_at(eng, 1)
    eng.step()
    assert eng.scheduler.held == {"keep", "gone"}
    eng.abort("gone")
    assert eng.num_layer_drops == 1 and not eng.scheduler.held
    eng.check_integrity()
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert outs["keep"].outputs[0].token_ids == ref[0][:24]
    assert eng.num_layer_resumes == 0
    eng.check_integrity()
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.pool.num_blocks


def test_online_work_needing_blocks_preempts_a_held_request_last_and_drops_the_step(
    tiny_llama_dir, tiny_llama_reference, linear_profile
):
    """In a small pool an online request preempts running offline requests that are not part
    of the stopped step first; when it must take a held one's blocks, the stopped step is
    dropped and every request still ends with the uninterrupted tokens."""
    prompts, ref, _ = tiny_llama_reference
    llm = conserve_llm(
        tiny_llama_dir,
        linear_profile,
        num_blocks=40,
        block_size=16,
        host_kv_gb=0,
        enable_prefix_caching=False,
        max_num_batched_tokens=4096,
    )
    eng = llm.engine
    for i in range(3):
        eng.add_request(f"off{i}", prompts[i], GREEDY, OFF)
    eng.step()  # all three start
    stop_next_at(eng, 1)
    eng.step()  # their decodes stop, held
    assert eng.scheduler.held == {"off0", "off1", "off2"}
    eng.add_request("on", prompts[7], GREEDY, ON)  # needs most of the pool
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
        eng.check_integrity()
    assert eng.scheduler.preemptions_by_class[OFF] > 0
    assert eng.num_layer_drops == 1
    assert [outs[f"off{i}"].outputs[0].token_ids for i in range(3)] == [r[:24] for r in ref[:3]]
    assert outs["on"].outputs[0].token_ids == ref[7][:24]
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.pool.num_blocks


def test_a_stopped_step_held_too_long_beside_online_work_is_dropped(
    tiny_llama_dir, tiny_llama_reference, linear_profile, monkeypatch
):
    """Online work that never leaves (a long stream) would keep a stopped step's requests out
    of every plan: past the hold limit the step is dropped, its requests compute its tokens
    again beside the online work, and their tokens are those of an uninterrupted run."""
    import conserve.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_HOLD_S", 0.0)
    monkeypatch.setattr(engine_module, "HOLD_STEPS", 0.0)
    prompts, ref, _ = tiny_llama_reference
    llm = conserve_llm(tiny_llama_dir, linear_profile, max_num_batched_tokens=4096)
    eng = llm.engine
    for i, p in enumerate(prompts[:2]):
        eng.add_request(f"off{i}", p, GREEDY, OFF)
    stop_next_at(eng, 2)
    eng.step()
    assert eng.scheduler.held == {"off0", "off1"}
    eng.add_request("on", prompts[5], GREEDY, ON)
    outs = {}
    for o in eng.step():  # the online prefill; the hold limit has passed: dropped
        outs[o.request_id] = o
    assert eng.num_layer_drops == 1 and not eng.scheduler.held
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
    assert eng.num_layer_resumes == 0
    assert [outs[f"off{i}"].outputs[0].token_ids for i in range(2)] == [r[:24] for r in ref[:2]]
    eng.check_integrity()
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.pool.num_blocks
