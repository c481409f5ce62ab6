"""The same greedy tokens as the reference under every scheduling condition: chunk sizes,
prefix caching on and off, requests joining mid-run, a pool small enough to force preemption,
and aborts. Every scenario ends with the KV integrity check on an idle engine."""

from __future__ import annotations

import pytest

from conserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


def run_all(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.engine.check_integrity()
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_prefill_sizes(tiny_llama_dir, tiny_llama_reference, chunk):
    prompts, ref, _ = tiny_llama_reference
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_prefill_chunk=chunk)
    assert run_all(llm, prompts) == ref


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prefix_caching_on_and_off(tiny_llama_dir, tiny_llama_reference, prefix_caching):
    prompts, ref, _ = tiny_llama_reference
    llm = LLM(str(tiny_llama_dir), dtype="float32", enable_prefix_caching=prefix_caching)
    assert run_all(llm, prompts) == ref
    # Second pass over the same prompts: served from the cache when it is on.
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    cached = sum(o.num_cached_tokens for o in outs)
    assert (cached > 0) == prefix_caching
    llm.engine.check_integrity()


def test_shared_prefix_between_running_requests(tiny_llama_dir, tiny_llama_reference):
    prompts, ref, _ = tiny_llama_reference
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=16)
    eng = llm.engine
    # The 600-token prompt first; then the same prompt while the first one is still decoding.
    eng.add_request("a", prompts[7], GREEDY)
    for _ in range(3):
        eng.step()
    eng.add_request("b", prompts[7], GREEDY)
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    assert outs["a"].outputs[0].token_ids == ref[7]
    assert outs["b"].outputs[0].token_ids == ref[7]
    assert outs["b"].num_cached_tokens == (600 - 1) // 16 * 16
    eng.check_integrity()


def test_requests_joining_mid_run(tiny_llama_dir, tiny_llama_reference):
    prompts, ref, _ = tiny_llama_reference
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_num_batched_tokens=256)
    eng = llm.engine
    outs = {}
    for i in range(0, len(prompts), 2):  # a new request every few steps
        eng.add_request(f"r{i}", prompts[i], GREEDY)
        for _ in range(5):
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o
    for i in range(1, len(prompts), 2):
        eng.add_request(f"r{i}", prompts[i], GREEDY)
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    assert [outs[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == ref
    eng.check_integrity()


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_small_pool_forces_preemption(tiny_llama_dir, tiny_llama_reference, prefix_caching):
    prompts, ref, _ = tiny_llama_reference
    # 48 blocks of 16 = 768 tokens: the largest request (600 + 64) fits, all eight do not.
    llm = LLM(
        str(tiny_llama_dir), dtype="float32", num_blocks=48, enable_prefix_caching=prefix_caching
    )
    assert run_all(llm, prompts) == ref
    assert llm.engine.scheduler.num_preemptions > 0


def test_abort_at_any_time_leaks_nothing(tiny_llama_dir, tiny_llama_reference):
    prompts, ref, _ = tiny_llama_reference
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_prefill_chunk=64, num_blocks=64)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, GREEDY)
    outs = {}
    aborted = {"r7", "r3", "r0", "r5"}  # mid-prefill, decoding, waiting ...
    for step in range(40):
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        if step in (2, 9, 15, 30):
            rid = sorted(aborted)[(2, 9, 15, 30).index(step)]
            aborted_out = eng.abort(rid)
            assert aborted_out is None or aborted_out.outputs[0].finish_reason in ("abort", None)
            eng.check_integrity()
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    for i in range(len(prompts)):
        if f"r{i}" not in aborted:
            assert outs[f"r{i}"].outputs[0].token_ids == ref[i]
    eng.check_integrity()
    assert eng.scheduler.kv.pool.num_free_blocks == eng.scheduler.kv.pool.num_blocks


@pytest.mark.slow
def test_smollm2_chunked_and_preempted(smollm2_reference):
    prompts, ref, _ = smollm2_reference
    llm = LLM("default", dtype="float32", max_prefill_chunk=64, num_blocks=48)
    assert run_all(llm, prompts) == ref
    assert llm.engine.scheduler.num_preemptions > 0


def test_pytorch_attention_fallback(tiny_llama_dir, tiny_llama_reference):
    """The pure-PyTorch decode path (used where the C kernel cannot build) gives the same
    tokens, here also under preemption."""
    prompts, ref, _ = tiny_llama_reference
    llm = LLM(str(tiny_llama_dir), dtype="float32", attention="torch", num_blocks=48)
    assert llm.engine.runner.kernels is None
    assert run_all(llm, prompts) == ref


def test_requests_sharing_a_prefix_that_start_together_compute_it_once(
    tiny_llama_dir, tiny_llama_reference
):
    """The 600-token prompt three times at once, budget for all three: the first computes it,
    the others wait one step for its blocks and compute only the last token's block."""
    prompts, ref, _ = tiny_llama_reference
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=16, max_num_batched_tokens=2048)
    eng = llm.engine
    for rid in ("a", "b", "c"):
        eng.add_request(rid, prompts[7], GREEDY)
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    assert [outs[r].outputs[0].token_ids for r in "abc"] == [ref[7]] * 3
    shared = (600 - 1) // 16 * 16
    assert [outs[r].num_cached_tokens for r in "abc"] == [0, shared, shared]
    assert eng.scheduler.num_shared_waits == 2
    eng.check_integrity()
