"""`conserve bench throughput`'s decode-step measurement, through the engine's step observer
(no engine internals): pure decode steps only, and the engine left as it was found."""

from __future__ import annotations

from conserve import LLM
from conserve.bench.common import StepClock
from conserve.bench.throughput import decode_step_ms


def test_decode_step_time_is_measured_on_pure_decode_steps():
    # the default model: the measurement asks for 2048 tokens of room per request
    llm = LLM("default", dtype="float32", max_num_batched_tokens=64)
    watch = StepClock()
    llm.engine.add_observer(watch)
    ms = decode_step_ms(llm, batch=3, prompt_len=40, steps=4)
    assert ms > 0
    carried = [ids for _, ids in watch.steps]
    # 3 prompts of 40 tokens in steps of at most 64 tokens, then 4 steps of one token each
    assert sum(sum(ids.values()) for ids in carried[:-4]) >= 3 * 40
    assert carried[-4:] == [{f"decode-3-{i}": 1 for i in range(3)}] * 4
    assert not llm.engine.has_unfinished() and llm.engine.stats().kv.request_tables == 0
