"""End to end: the real server on a free loopback port with the default model, driven by the
official `openai` client (sync and async) and by raw HTTP for the error cases."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from conftest import API_KEY


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]


def test_chat_answers_and_reports_usage(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert r.object == "chat.completion"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.service_tier == "default"


def test_chat_prompt_matches_the_reference_template(client, model, default_source):
    """The server's prompt length equals transformers' apply_chat_template length (no doubled
    start token), as reported by usage.prompt_tokens."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hello there"}]
    ref = AutoTokenizer.from_pretrained(
        str(default_source.folder), gguf_file=default_source.gguf_file
    ).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref_ids = ref["input_ids"] if hasattr(ref, "keys") else ref
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert r.usage.prompt_tokens == len(ref_ids)


def test_chat_streaming_with_usage(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"] or finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    full = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        temperature=0,
        max_tokens=20,
    )
    assert text == full.choices[0].message.content


def test_completion_stream_and_stop(client, model):
    r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and "5" in text
    cut = client.completions.create(
        model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["7"]
    )
    assert cut.choices[0].text == text[: text.index("7")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stream=True
        )
    )
    assert streamed == text


def test_seed_reproduces_and_n_two(client, model):
    kw = dict(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=1.0,
        max_tokens=16,
    )
    a = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    assert a == b
    two = client.chat.completions.create(seed=7, n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content


def test_logprobs_chat_and_completion(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 for c in content)
    c = client.completions.create(
        model=model, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and len(lp.top_logprobs[0]) == 2


def test_async_client_concurrent(server, model):
    async def run() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        rs = await asyncio.gather(
            *(
                ac.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"Say the number {i}."}],
                    temperature=0,
                    max_tokens=8,
                )
                for i in range(6)
            )
        )
        return [r.choices[0].message.content for r in rs]

    texts = asyncio.run(run())
    assert len(texts) == 6 and all(texts)


def test_flex_tier_is_echoed(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        service_tier="flex",
    )
    assert r.service_tier == "flex"


def _usage_stream(client, model, tier: str) -> tuple[str, list[int], int]:
    """A streamed chat with the usage so far in every chunk: (text, completion tokens each text
    chunk added, final completion tokens)."""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a long story about a cat."}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
        service_tier=tier,
    )
    text, per_chunk, seen = "", [], 0
    for c in stream:
        if c.choices and c.choices[0].delta.role:
            continue  # the first chunk: the role, before any token (and any usage)
        if c.choices:
            assert c.usage is not None and c.usage.completion_tokens >= seen
            if c.choices[0].delta.content:
                text += c.choices[0].delta.content
                per_chunk.append(c.usage.completion_tokens - seen)
            seen = c.usage.completion_tokens
        else:
            final = c.usage.completion_tokens
    return text, per_chunk, final


def test_offline_streams_carry_several_tokens_per_chunk_with_running_usage(client, model):
    """Offline (flex) outputs reach the API process every half second, merged per request:
    the chunks of its stream hold several tokens, counted by `continuous_usage_stats`; the
    text is the one an online stream gets."""
    flex_text, flex_chunks, flex_total = _usage_stream(client, model, "flex")
    text, chunks, total = _usage_stream(client, model, "default")
    assert flex_total == total == 48 and sum(flex_chunks) <= 48 and sum(chunks) <= 48
    assert flex_text == text
    assert max(chunks) <= 2 and len(chunks) >= 40  # online: a chunk per token
    assert max(flex_chunks) >= 4 and len(flex_chunks) < len(chunks)


def _post(server: str, path: str, body, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=60, **kw)


def _assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_errors(server, model):
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    _assert_error(
        _post(server, "/v1/chat/completions", chat, key=None), 401, code="invalid_api_key"
    )
    _assert_error(_post(server, "/v1/chat/completions", chat, key="wrong"), 401)
    _assert_error(
        _post(server, "/v1/chat/completions", chat | {"temperature": -1}), 400, param="temperature"
    )
    _assert_error(
        _post(server, "/v1/chat/completions", chat | {"model": "gpt-9"}),
        404,
        code="model_not_found",
    )
    _assert_error(_post(server, "/v1/nothing-here", chat), 404)
    _assert_error(_post(server, "/v1/chat/completions", {"model": model}), 400, param="messages")
    _assert_error(
        _post(server, "/v1/completions", {"model": model, "prompt": "x" * 2_000_000}), 413
    )
    long_prompt = "hello " * 9000
    _assert_error(
        _post(server, "/v1/completions", {"model": model, "prompt": long_prompt, "max_tokens": 10}),
        400,
        code="context_length_exceeded",
    )
    r = httpx.post(
        f"{server}/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    _assert_error(r, 400)
    # still serving
    ok = _post(server, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_no_kv_blocks_held_when_idle(server):
    r = httpx.get(f"{server}/debug/kv", timeout=30)
    assert r.status_code == 200
    assert r.json()["kv_tables"] == 0 and r.json()["running"] == 0


def test_metrics_exposed(server, client, model):
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    text = httpx.get(f"{server}/metrics", timeout=30).text
    for name in (
        'conserve:time_to_first_token_seconds_bucket{class="online"',
        'conserve:inter_token_latency_seconds_count{class="online"}',
        'conserve:e2e_request_latency_seconds_count{class="online"}',
        'conserve:num_requests_running{class="online"}',
        'conserve:num_requests_waiting{class="offline"}',
        "conserve:kv_cache_usage_perc",
        "conserve:prefix_cache_queries_total",
        "conserve:prefix_cache_hits_total",
        "conserve:shared_prefix_waits_total",
        'conserve:num_preemptions_total{kind="recompute_offline"}',
        'conserve:num_preemptions_total{kind="layer"}',
        'conserve:num_aborted_requests_total{class="online"}',
        'conserve:num_aborted_requests_total{class="offline"}',
        "conserve:checkpointed_blocks_total",
        "conserve:recomputed_tokens_total",
        "conserve:iteration_time_ratio_bucket",
        'conserve:prompt_tokens_total{class="online"}',
        'conserve:generation_tokens_total{class="online"}',
        "conserve:iteration_time_seconds_count",
    ):
        assert name in text, name


def wait_idle(server: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{server}/debug/kv", timeout=30).json()
        if state["kv_tables"] == 0 and state["running"] == 0 and state["waiting"] == 0:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def aborted_requests(server: str) -> dict[str, int]:
    """The engine's own count of requests it aborted before they finished, by class."""
    text = httpx.get(f"{server}/metrics", timeout=30).text
    pattern = r'^conserve:num_aborted_requests_total\{class="(\w+)"\} ([0-9.e+]+)$'
    return {k: int(float(v)) for k, v in re.findall(pattern, text, re.MULTILINE)}


def test_32_streams_with_8_disconnecting_half_way(server, model):
    """8 of 32 streaming clients leave after 20 chunks of 400 tokens: the engine aborts exactly
    those 8 (its own count, so a request that merely ran to its end does not pass), the others
    finish, and every KV block is free afterwards."""

    async def one(i: int, ac: httpx.AsyncClient) -> str:
        leaver = i % 4 == 0
        body = {
            "model": model,
            "stream": True,
            # a leaver asks for far more than it reads: only an abort ends it early
            "max_tokens": 400 if leaver else 40,
            "temperature": 0,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Story {i}"}],
        }
        chunks = 0
        async with ac.stream(
            "POST",
            f"{server}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done"
                chunks += 1
                if leaver and chunks == 20:
                    return "left"  # leaving the context closes the connection mid-stream
        return "cut"

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as ac:
            return await asyncio.gather(*(one(i, ac) for i in range(32)))

    wait_idle(server)  # nothing of earlier tests left to abort: the counts below are exact
    before = aborted_requests(server)
    assert set(before) == {"online", "offline"}
    results = asyncio.run(run())
    assert results.count("left") == 8 and results.count("done") == 24
    state = wait_idle(server)
    assert state["integrity_error"] is None and state["kv_usage"] == 0
    after = aborted_requests(server)
    assert after["online"] - before["online"] == 8, (before, after)
    assert after["offline"] == before["offline"]


def test_streamed_text_never_contains_a_stop_string_split_across_tokens(client, model):
    kw = dict(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[", 7"])
    full = client.completions.create(**kw).choices[0]
    assert full.finish_reason == "stop" and ", 7" not in full.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == full.text
