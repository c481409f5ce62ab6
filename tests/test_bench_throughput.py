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


def test_engine_reset_prefix_cache_makes_a_repeated_prompt_compute_again():
    from conserve.sampling.params import SamplingParams

    llm = LLM("default", dtype="float32", num_blocks=64)
    eng = llm.engine
    prompt = list(range(300, 340))  # two full blocks and a part
    p = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([prompt], p, use_tqdm=False)
    again = llm.generate([prompt], p, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32
    eng.reset_prefix_cache()
    fresh = llm.generate([prompt], p, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0
    eng.check_integrity()
