"""Fuzzing the API with malformed and extreme bodies: never a 5xx, and the engine still answers
afterwards with its KV integrity intact."""

from __future__ import annotations

import json

import httpx
from conftest import API_KEY
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | junk,
        "content": st.text(max_size=40) | junk,
    },
)
# Valid requests stay short: max_tokens is always there, small or junk (a 400); a missing or
# null max_tokens would mean "up to the context window", which is valid but slow.
common = {
    "model": st.sampled_from(["SmolLM2-135M-Instruct", "other"]) | junk,
    "temperature": st.floats(-1, 3) | junk,
    "top_p": st.floats(-0.5, 1.5) | junk,
    "top_k": st.integers(-5, 100) | junk,
    "min_p": st.floats(-1, 2) | junk,
    "seed": st.integers(-(2**70), 2**70) | junk,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | junk,
    "n": st.integers(-1, 3) | junk,
    "stream": st.booleans() | junk,
    "logprobs": st.booleans() | st.integers(-2, 25) | junk,
    "top_logprobs": st.integers(-2, 25) | junk,
    "presence_penalty": st.floats(-3, 3) | junk,
    "service_tier": st.sampled_from(["flex", "default", "bogus"]) | junk,
    "stop_token_ids": st.lists(st.integers(-5, 60_000), max_size=3) | junk,
    "extra_field": junk,
}
max_tokens = st.integers(-3, 6) | junk.filter(lambda x: x is not None)
chat_body = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3) | junk, "max_tokens": max_tokens},
    optional=common,
)
completion_body = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=50) | st.lists(st.integers(-10, 60_000), max_size=8) | junk,
        "max_tokens": max_tokens,
    },
    optional=common,
)


FUZZ = settings(
    max_examples=260,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate),  # report the first failing body as it is
    derandomize=True,
)


def _send(server: str, path: str, body) -> None:
    try:
        content = json.dumps(body, allow_nan=True)
    except (TypeError, ValueError):
        content = str(body)
    r = httpx.post(f"{server}{path}", content=content, headers=AUTH, timeout=60)
    assert r.status_code < 500, (path, content[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and "type" in err


@FUZZ
@given(body=chat_body)
def test_fuzz_chat(server, body):
    _send(server, "/v1/chat/completions", body)


@FUZZ
@given(body=completion_body)
def test_fuzz_completions(server, body):
    _send(server, "/v1/completions", body)


def test_engine_still_answers_after_fuzzing(server):
    r = httpx.post(
        f"{server}/v1/completions",
        json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 3},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    state = httpx.get(f"{server}/debug/kv", timeout=30).json()
    assert state["integrity_error"] is None
