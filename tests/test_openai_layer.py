"""The framework-free OpenAI layer (conserve.openai) and batch lines prepared once, without
HTTP and without an engine: a stub backend answers with fixed deltas."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from conserve.batch.execute import batch_order, line_executor
from conserve.batch.prepare import PreparedLine, prepare_line
from conserve.batch.validate import BatchLine
from conserve.core.messages import RequestDelta, SeqDelta
from conserve.engine.request import RequestClass
from conserve.openai.answer import answer
from conserve.openai.errors import OpenAIError
from conserve.openai.formats import finish_reason
from conserve.openai.prepare import parse_body, prepare, request_class
from conserve.openai.protocol import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "Name three rivers."}]


class CountingTokenizer:
    """The real tokenizer, counting chat-template applications."""

    def __init__(self, inner) -> None:
        self.inner, self.chat_template_calls = inner, 0
        self.vocab_size = inner.vocab_size

    def apply_chat_template(self, messages, **kw):
        self.chat_template_calls += 1
        return self.inner.apply_chat_template(messages, **kw)

    def encode(self, text, add_special_tokens=True):
        return self.inner.encode(text, add_special_tokens)

    def token_text(self, token_id):
        return self.inner.token_text(token_id)


class StubBackend:
    """A served model whose every request generates `k` tokens 100, 101, ... in one delta."""

    def __init__(self, tokenizer, max_model_len: int = 256, k: int = 3) -> None:
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, "m", max_model_len
        self.k = k
        self.sent: list[tuple[str, list[int], object, RequestClass]] = []
        self.dead_reason = None
        self.alive = True
        # what the batch planner reads of the engine
        self.device, self.dtype = "cpu", "float32"
        self.model_config = SimpleNamespace(
            num_layers=2, num_kv_heads=2, head_dim=8, num_params=10**6
        )
        self.config = SimpleNamespace(cache=SimpleNamespace(block_size=16))

    async def generate(
        self, request_id, prompt_token_ids, params, request_class, stream, received=None
    ):
        self.sent.append((request_id, prompt_token_ids, params, request_class))
        ids = list(range(100, 100 + self.k))
        seqs = [SeqDelta(i, "abc", ids, None, "length", None) for i in range(params.n)]
        yield RequestDelta(request_id, seqs, True, len(prompt_token_ids), 0, self.k * params.n)


@pytest.fixture()
def backend(default_tokenizer) -> StubBackend:
    return StubBackend(CountingTokenizer(default_tokenizer))


def test_a_chat_body_is_prepared_into_template_token_ids_and_sampling_params(backend):
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 0.5, "logprobs": True, "seed": 7}
    )
    p = prepare(backend, body, request_class(body))
    expected = backend.tokenizer.inner.apply_chat_template(MESSAGES)
    assert p.prompts == [expected]
    (sp,) = p.params
    # no max_tokens on a chat request: up to the end of the context window
    assert sp.max_tokens == backend.max_model_len - len(expected)
    assert (sp.temperature, sp.top_p, sp.seed, sp.logprobs) == (0.5, 1.0, 7, 0)
    assert p.klass is RequestClass.ONLINE and p.tier == "default" and not p.stream


def test_completion_prompts_get_one_params_each_and_the_default_bound(backend):
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": [[5, 6, 7], [8]], "service_tier": "flex", "logprobs": 2}
    )
    p = prepare(backend, body, request_class(body))
    assert p.prompts == [[5, 6, 7], [8]]
    assert [sp.max_tokens for sp in p.params] == [16, 16]  # OpenAI's completions default
    assert [sp.logprobs for sp in p.params] == [2, 2]
    assert p.klass is RequestClass.OFFLINE and p.tier == "flex"


def test_errors_are_openai_error_objects(backend):
    with pytest.raises(OpenAIError) as bad_body:
        parse_body("/v1/chat/completions", {"model": "m", "messages": [{"role": "robot"}]})
    err = bad_body.value
    assert err.status == 400
    assert err.body()["error"]["param"] == "messages.0.role"
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}

    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_tokens": 1000})
    with pytest.raises(OpenAIError) as too_long:
        prepare(backend, body, RequestClass.ONLINE)
    assert too_long.value.status == 400
    assert too_long.value.body()["error"]["code"] == "context_length_exceeded"

    body = CompletionRequest.model_validate({"model": "other", "prompt": [10**9]})
    with pytest.raises(OpenAIError) as wrong_model:  # the model is checked before the prompt
        prepare(backend, body, RequestClass.ONLINE)
    assert wrong_model.value.status == 404
    assert wrong_model.value.body()["error"]["code"] == "model_not_found"


def test_answer_counts_requests_as_they_are_admitted_and_returns_the_body(backend):
    body = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"], "n": 2})
    p = prepare(backend, body, RequestClass.ONLINE)
    tracked: list[RequestClass] = []

    def track(klass, stream):
        tracked.append(klass)
        return stream

    async def run():
        pending = answer(backend, p, track)
        assert tracked == [RequestClass.ONLINE] * 2  # before anything is awaited
        return await pending

    out = asyncio.run(run())
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["completion_tokens"] == 2 * 2 * backend.k
    rids = [rid for rid, *_ in backend.sent]
    assert rids == [f"{out['id']}-0", f"{out['id']}-1"]


def test_finish_reasons_as_openai_names_them():
    assert [finish_reason(r) for r in (None, "length", "stop", "abort")] == [
        None,
        "length",
        "stop",
        "stop",
    ]


def _chat_line(custom_id: str = "a", **extra) -> BatchLine:
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 4} | extra
    return BatchLine(1, custom_id, "/v1/chat/completions", body)


@pytest.mark.parametrize("order", ["dfs", "blend"])
def test_a_planned_batch_line_applies_the_chat_template_once(backend, order):
    plan = list(batch_order(backend, order)([_chat_line()]))
    assert backend.tokenizer.chat_template_calls == 1  # planning prepared it
    (line,) = plan
    assert isinstance(line, PreparedLine) and line.prep.shape is not None
    assert line.prep.shape.prompt_ids == line.prep.request.prompts[0]

    result = asyncio.run(line_executor(None, backend)(line))
    assert result.status_code == 200
    assert backend.tokenizer.chat_template_calls == 1  # running it did not prepare it again
    (_, sent_ids, params, klass) = backend.sent[0]
    assert sent_ids == line.prep.shape.prompt_ids
    assert params.max_tokens == 4 and klass is RequestClass.OFFLINE


def test_an_unplanned_batch_line_is_prepared_when_it_runs(backend):
    result = asyncio.run(line_executor(None, backend)(_chat_line()))
    assert result.status_code == 200
    assert backend.tokenizer.chat_template_calls == 1


def test_a_batch_line_is_answered_with_the_errors_the_endpoint_gives(backend):
    execute = line_executor(None, backend)
    streamed = asyncio.run(execute(_chat_line(stream=True)))
    assert streamed.status_code == 400 and streamed.body["error"]["param"] == "stream"
    # a wrong model and an invalid prompt: the model error, as at the endpoint
    bad = BatchLine(2, "b", "/v1/completions", {"model": "x", "prompt": [10**9]})
    prep = prepare_line(backend, bad)
    assert prep.shape is None and prep.request is None
    answered = asyncio.run(execute(PreparedLine.of(bad, prep)))
    assert answered.status_code == 404 and answered.error["code"] == "model_not_found"
    assert backend.sent == []
