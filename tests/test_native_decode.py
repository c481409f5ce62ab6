"""Whole decoder layers in compiled code for small bf16 decode steps (decode_layer.c): the same
logits and K/V as the torch layer path on the default model, the same tokens after a stop
between layers and a resume, and the torch path for steps it does not take."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import native_kernels

from conserve import LLM
from conserve.bench.common import StepClock
from conserve.engine.batch import IterationPreempted, StopFlag
from conserve.kernels import decode_layer
from conserve.kernels.decode_layer import AMX_NATIVE_ROWS, NATIVE_ROWS, native_rows
from conserve.kernels.linear import FEW_KERNEL_ROWS
from conserve.sampling.params import SamplingParams

TEST_ROWS = 9


@pytest.fixture(scope="module")
def engine_llm() -> LLM:
    native_kernels()
    llm = LLM("default", dtype="bfloat16", num_blocks=256)
    native = llm.engine.runner.native
    assert native is not None, "the default bf16 engine runs layers natively"
    assert native.max_rows == native_rows()
    # whatever this machine's default, the kernel is tested up to TEST_ROWS rows (its linear
    # layers take rows in groups of 8: 9 rows make a second, partial group)
    native.max_rows = TEST_ROWS
    return llm


@pytest.fixture
def llm(engine_llm):
    """The shared engine; every request a test left is aborted after it, then checked."""
    yield engine_llm
    eng = engine_llm.engine
    for i in range(16):  # the ids _decode_batch gives (abort of an unknown id does nothing)
        eng.abort(f"native-{i}")
    assert not eng.has_unfinished()
    eng.check_integrity()


def _decode_batch(llm: LLM, prompts: list[str]):
    """A decode step of these prompts (each prefilled, one token generated), not yet run."""
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    ids = [f"native-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, p, params)
    clock = StepClock()
    eng.add_observer(clock)
    try:
        while True:  # until a step carries one token of every request
            eng.step()
            last = clock.ended[-1].batch
            if len(last.chunks) == len(ids) and all(c.num_tokens == 1 for c in last.chunks):
                break
        eng.step()
        batch = clock.ended[-1].batch
    finally:
        eng.remove_observer(clock)
    return ids, batch


def _logits(llm: LLM, batch, native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    runner = llm.engine.runner
    keep = runner.native
    runner.native = keep if native else None
    try:
        logits, _ = runner.forward(batch)
    finally:
        runner.native = keep
    slots = [c.block_ids[c.start // 16] * 16 + c.start % 16 for c in batch.chunks]
    k = runner.kv.k[:, :, :, :, :].view(runner.kv.k.shape[0], runner.kv.k.shape[1], -1, 64)
    return logits, k[:, :, slots].clone()


@pytest.mark.parametrize("rows", sorted({1, FEW_KERNEL_ROWS, 4, TEST_ROWS}))
def test_native_layers_give_the_torch_paths_logits_and_kv(llm, rows):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def f(x):", "Once upon a"]
    prompts = (prompts + [f"Request number {i} says" for i in range(rows)])[:rows]
    ids, batch = _decode_batch(llm, prompts)
    assert llm.engine.runner._start(batch).native is not None  # the step runs natively
    native_logits, native_k = _logits(llm, batch, native=True)
    torch_logits, torch_k = _logits(llm, batch, native=False)
    model = llm.engine.runner.model
    if all(m.fast.path(rows) == "kernel" for m in model.modules() if getattr(m, "fast", None)):
        # both paths run the same compiled linear kernel here, and the native layer rounds
        # where the torch layer does: the same bits
        assert torch.equal(native_k, torch_k) and torch.equal(native_logits, torch_logits)
    else:
        # the torch path's linear layers are oneDNN's here: float32 sums in another order,
        # a bf16 rounding step now and then, carried through the layers (measured: K within
        # 1%, logits within 2% of their largest value)
        diff = (native_k.float() - torch_k.float()).abs().amax(dim=(1, 2, 3))
        size = torch_k.float().abs().amax(dim=(1, 2, 3))
        assert diff[0] == 0 and (diff / size).max() < 0.03
        assert torch.equal(native_logits.argmax(-1), torch_logits.argmax(-1))
        scale = torch_logits.abs().amax(-1, keepdim=True)
        assert ((native_logits - torch_logits).abs() / scale).max() < 0.04


def test_native_step_stopped_between_layers_resumes_to_the_same_logits(llm):
    ids, batch = _decode_batch(llm, ["The capital of France is", "def f(x):"])
    runner = llm.engine.runner
    whole, _ = runner.forward(batch)
    calls = {"n": 0}

    def stop() -> bool:  # stop before the 5th layer
        calls["n"] += 1
        return calls["n"] == 5

    with pytest.raises(IterationPreempted) as stopped:
        runner.execute(batch, stop)
    assert stopped.value.layer == 4 and stopped.value.continuation.native is not None
    p = runner._layers(stopped.value.continuation, None)
    resumed, _ = runner._logits(p)
    assert torch.equal(resumed, whole)


def test_native_layers_in_one_call_stop_at_the_flag_and_resume(llm, monkeypatch):
    """The compiled loop over layers reads the step's stop flag before each safepoint layer:
    set before the call, a step stops before its first layer, a resumed one after running one
    layer (or up to the next multiple of safepoint_every); the layers left give the same
    logits as a step never stopped."""
    ids, batch = _decode_batch(llm, ["The capital of France is", "def f(x):"])
    runner = llm.engine.runner
    assert runner.native_loop
    whole, _ = runner.forward(batch)
    flag = StopFlag()
    flag.set()
    with pytest.raises(IterationPreempted) as stopped:
        runner.execute(batch, flag)
    assert stopped.value.layer == 0
    p = stopped.value.continuation
    with pytest.raises(IterationPreempted) as stopped:
        runner._layers(p, flag)  # resumed: one layer runs whatever the flag says
    assert stopped.value.layer == 1
    monkeypatch.setattr(runner, "safepoint_every", 4)
    with pytest.raises(IterationPreempted) as stopped:
        runner._layers(p, flag)
    assert stopped.value.layer == 4
    resumed, _ = runner._logits(runner._layers(p, StopFlag()))
    assert torch.equal(resumed, whole)


def test_native_layers_stop_when_another_thread_sets_the_flag(llm):
    """While the compiled layers run (the GIL released), another thread sees the step's
    progress move and sets the flag: the step stops at a later layer, not at its end."""
    ids, batch = _decode_batch(llm, ["The capital of France is", "def f(x):"])
    runner = llm.engine.runner
    whole, _ = runner.forward(batch)
    n = len(runner.model.layers)
    stops = []
    for _ in range(10):  # a thread the OS runs too late sees no progress: try again
        flag, seen = StopFlag(), []

        def watch(flag=flag, seen=seen) -> None:
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                done = runner.progress
                if 0 < done < 0.5:
                    seen.append(done)
                    flag.set()
                    return

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.005)  # the watcher is running
        try:
            p = runner._layers(runner._start(batch), flag, resumed=False)
        except IterationPreempted as e:
            p = e.continuation
            stops.append((seen[0], e.layer))
            resumed, _ = runner._logits(runner._layers(p, None))
            assert torch.equal(resumed, whole)
        watcher.join()
        if stops:
            break
    assert stops, "no run was stopped while its layers ran"
    seen_at, layer = stops[0]
    assert 0 < seen_at * n < layer < n


def test_native_rows_default_and_override(monkeypatch):
    monkeypatch.delenv("CONSERVE_NATIVE_ROWS", raising=False)
    monkeypatch.setattr(decode_layer, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert native_rows() == NATIVE_ROWS
    monkeypatch.setattr(decode_layer, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert native_rows() == AMX_NATIVE_ROWS
    monkeypatch.setenv("CONSERVE_NATIVE_ROWS", "5")
    assert native_rows() == 5


def test_steps_the_native_path_does_not_take_use_the_torch_layers(llm, monkeypatch):
    runner = llm.engine.runner
    monkeypatch.setattr(runner.native, "max_rows", 3)
    prompts = [f"Request number {i} says" for i in range(4)]
    ids, batch = _decode_batch(llm, prompts)
    assert runner._start(batch).native is None  # more rows than max_rows
    for rid in ids:
        llm.engine.abort(rid)
    ids, batch = _decode_batch(llm, ["Hello"])
    assert runner._start(batch).native is not None
