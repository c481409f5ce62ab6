"""The Python API on the real default model: chat template, sampling options, stop conditions,
n > 1, logprobs, order of outputs. Every test ends with the KV integrity check."""

from __future__ import annotations

import math

import pytest

from conserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default")


@pytest.fixture(autouse=True)
def _integrity(llm):
    yield
    llm.engine.check_integrity()


def test_chat_answers_a_factual_question(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>, not the length cap


def test_chat_prompt_ids_equal_the_reference_template(llm, default_source):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
    ]
    ref = AutoTokenizer.from_pretrained(
        str(default_source.folder), gguf_file=default_source.gguf_file
    ).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref_ids = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert llm.tokenizer.apply_chat_template(messages) == list(ref_ids)


def test_outputs_come_back_in_input_order(llm):
    prompts = ["One, two, three,", "The alphabet starts with A, B,", "Monday, Tuesday,"]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 3, 7)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 3, 7]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


@pytest.fixture(scope="module")
def llm_fp32() -> LLM:
    return LLM("default", dtype="float32")


def test_seed_gives_the_same_output_whatever_the_batch(llm_fp32):
    """In float32: a request's logits barely depend on what else is in its batch, so its seeded
    samples are the same. (In bfloat16 the batch's shapes change the matmuls' rounding enough
    to move a sample that sits near a top-p or cumulative-probability boundary: seen on an AMX
    CPU at the second token.)"""
    llm = llm_fp32
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=1234)
    alone = llm.generate(["Tell me about the sea."], seeded, use_tqdm=False)[0]
    others = [SamplingParams(temperature=0.7, max_tokens=30), SamplingParams(temperature=0)]
    batch = llm.generate(
        ["Write a poem.", "Tell me about the sea.", "List three fruits."],
        [others[0], seeded, others[1]],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = llm.generate(
        ["Tell me about the sea."],
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=99),
        use_tqdm=False,
    )[0]
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids
    llm.engine.check_integrity()


def test_n_samples_share_the_prompt_and_differ(llm):
    out = llm.generate(
        "My favourite animal is",
        SamplingParams(n=3, temperature=1.0, max_tokens=16, seed=5),
        use_tqdm=False,
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert all(len(c.token_ids) == 16 for c in out.outputs)


def test_stop_string_is_cut_from_the_text(llm):
    prompt = "Count: 1, 2, 3, 4, 5, 6,"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    text = free[0].outputs[0].text
    stop = "9"
    assert stop in text, text
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_token_id_ends_generation(llm):
    prompt = "Count: 1, 2, 3, 4, 5,"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    ids = free[0].outputs[0].token_ids
    target = ids[4]
    first = ids.index(target)
    out = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[target]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_logprobs_of_chosen_and_top_tokens(llm):
    out = llm.generate(
        "The sky is", SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    assert len(out.logprobs) == 6
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry.token_id == tok
        assert entry.logprob <= 0
        assert len(entry.top) == 3
        values = [lp for _, lp in entry.top]
        assert values == sorted(values, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.top[0][0] == tok and math.isclose(entry.top[0][1], entry.logprob)


def test_ignore_eos_and_min_tokens(llm):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    short = llm.chat(conv, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert short.finish_reason == "stop"
    n = len(short.token_ids)
    longer = llm.chat(conv, SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 5))
    assert len(longer[0].outputs[0].token_ids) >= n + 5
    forced = llm.chat(conv, SamplingParams(temperature=0, max_tokens=n + 10, ignore_eos=True))
    assert len(forced[0].outputs[0].token_ids) == n + 10
    assert forced[0].outputs[0].finish_reason == "length"


def test_prompt_beyond_the_context_window_is_refused(llm):
    from conserve.engine.engine import ContextLengthError

    too_long = [100] * (llm.engine.max_model_len - 5)
    with pytest.raises(ContextLengthError, match="maximum context length"):
        llm.generate([too_long], SamplingParams(max_tokens=10), use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_invalid_token_ids_are_refused(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=2), use_tqdm=False)
