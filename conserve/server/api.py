"""The OpenAI-compatible HTTP API (FastAPI). Runs in the API process; the engine runs in the
engine core process behind `EngineClient`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from conserve import __version__
from conserve.engine.request import RequestClass
from conserve.model.tokenizer import Tokenizer
from conserve.sampling.params import SamplingParams
from conserve.server.client import EngineClient, EngineDeadError
from conserve.server.core import RequestDelta
from conserve.server.metrics import Metrics, RequestTimer
from conserve.server.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from conserve.batch.manager import BatchManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    # requests admitted but without a first token yet, per class; beyond it: 429
    max_queued_online: int = 1024
    max_queued_offline: int = 100_000
    # the Files and Batch API are served when a data directory is given
    data_dir: str | None = None
    max_file_bytes: int = 200 << 20
    # the order in which batch lines enter the engine (conserve.batch.planner.ORDERS), and
    # the device figures the planner's densities are stated in (None: its per-device default)
    batch_order: str = "dfs"
    planner_tflops: float | None = None
    planner_gbs: float | None = None


class ServerState:
    """Mutable state of the API process: the engine client, metrics, admission counters."""

    def __init__(self) -> None:
        self.client: EngineClient | None = None
        self.metrics = Metrics()
        self.unknown_fields: set[str] = set()
        self.queued = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        self.in_flight = 0
        self.draining = False
        self.batches: BatchManager | None = None  # the Batch API, when a data dir is given


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(
    client_factory, settings: ServerSettings, state: ServerState | None = None
) -> FastAPI:
    """`client_factory()` builds the EngineClient (it starts the engine core)."""
    state = state or ServerState()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client: EngineClient = client_factory()
        client.start(asyncio.get_running_loop())
        state.client = client
        slo = ""
        if client.policy == "conserve":
            slo = f", online SLOs: TTFT {client.ttft_slo:g} s, TPOT {client.tpot_slo:g} s"
        print(
            f"conserve: model {client.model_name}, policy {client.policy}{slo}",
            file=sys.stderr,
            flush=True,
        )
        if state.batches is not None:
            from conserve.server.batch_api import start_batches

            await start_batches(state, client, settings)
        yield
        if state.batches is not None:
            await state.batches.stop()
        client.shutdown()

    app = FastAPI(title="conserve", version=__version__, lifespan=lifespan)
    app.state.conserve = state

    def client() -> EngineClient:
        assert state.client is not None
        return state.client

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(OpenAIError(exc.status_code, str(exc.detail), kind))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        size = request.headers.get("content-length")
        upload = request.method == "POST" and request.url.path == "/v1/files"
        cap = settings.max_file_bytes + (64 << 10) if upload else settings.max_body_bytes
        if size is not None and size.isdigit() and int(size) > cap:
            return error_response(
                OpenAIError(413, f"request body over {cap} bytes", code="body_too_large")
            )
        if state.draining and request.url.path.startswith("/v1/"):
            return error_response(OpenAIError(503, "the server is shutting down", "server_error"))
        if settings.api_key and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                return error_response(
                    OpenAIError(
                        401,
                        "missing or wrong API key",
                        "authentication_error",
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        if not client().alive:
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, Any]:
        """The version, and the scheduling policy with its online SLOs (seconds)."""
        c = state.client
        if c is None:
            return {"version": __version__}
        return {
            "version": __version__,
            "policy": c.policy,
            "ttft_slo": c.ttft_slo,
            "tpot_slo": c.tpot_slo,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        c = client()
        return {
            "object": "list",
            "data": [
                {
                    "id": c.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "conserve",
                    "max_model_len": c.max_model_len,
                }
            ],
        }

    @app.get("/debug/kv")
    async def debug_kv() -> dict[str, Any]:
        """KV and queue state, and the engine's integrity check (null when it holds)."""
        s = await client().stats()
        state.metrics.update_engine(s)
        return {
            "running": s.running,
            "waiting": s.waiting,
            "kv_usage": s.kv_usage,
            "kv_tables": s.kv_tables,
            "integrity_error": s.integrity_error,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        if client().alive:
            state.metrics.update_engine(await client().stats())
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        log_unknown(state, body)
        return await respond(request, prepare_chat(client(), body, request_class(body)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        log_unknown(state, body)
        return await respond(request, prepare_completion(client(), body, request_class(body)))

    async def respond(request: Request, p: Prepared) -> Response:
        c = client()
        if not c.alive:
            raise OpenAIError(503, "the engine is not running", "server_error")
        limit = (
            settings.max_queued_online
            if p.klass == RequestClass.ONLINE
            else settings.max_queued_offline
        )
        if state.queued[p.klass] + len(p.prompts) > limit:
            err = OpenAIError(
                429,
                f"too many queued {p.klass.value} requests; retry later",
                "rate_limit_error",
                code="queue_full",
            )
            return JSONResponse(err.body(), status_code=429, headers={"Retry-After": "1"})
        streams = start_streams(state, c, p)
        if p.stream:
            return StreamingResponse(sse(request, streams, p.fmt), media_type="text/event-stream")
        try:
            finals = await until_disconnected(request, collect_all(streams))
            if finals is None:  # the client left: its requests are aborted
                return Response(status_code=499)
        except EngineDeadError as e:
            raise OpenAIError(503, f"the engine failed: {e}", "server_error") from e
        except ValueError as e:
            raise OpenAIError(400, str(e)) from e
        return JSONResponse(p.fmt.full(finals, len(p.prompts)))

    if settings.data_dir is not None:
        from conserve.server.batch_api import install_batch_api

        install_batch_api(app, state, settings)

    return app


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """A pydantic validation failure as the 400 error the endpoints answer."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = first.get("msg", "invalid request")
    return OpenAIError(400, f"{'.'.join(loc) or 'body'}: {msg}", param=".".join(loc) or None)


def log_unknown(state: ServerState, body: Any) -> None:
    for name in body.model_extra or {}:
        if name not in state.unknown_fields:
            state.unknown_fields.add(name)
            log.warning("ignoring unknown request field %r (logged once)", name)


def check_model(c: EngineClient, name: str) -> None:
    if name != c.model_name:
        raise OpenAIError(
            404,
            f"the model {name!r} does not exist; this server serves {c.model_name!r}",
            code="model_not_found",
            param="model",
        )


@dataclass
class Prepared:
    """A validated request, tokenized and checked, ready to send to the engine."""

    rid: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    klass: RequestClass
    stream: bool
    fmt: _Format


def chat_prompt_ids(tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The prompt of a chat request: its messages through the model's chat template."""
    try:
        return tokenizer.apply_chat_template(body.template_messages())
    except Exception as e:  # noqa: BLE001 - template errors are the caller's input
        raise OpenAIError(400, f"cannot apply the chat template: {e}", param="messages") from e


def requested_max_tokens(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """The request's output bound; None (chat without one) means up to the context window."""
    if isinstance(body, ChatCompletionRequest):
        return body.max_completion_tokens or body.max_tokens
    return body.max_tokens or 16  # OpenAI's default for /v1/completions


def prepare_chat(c: EngineClient, body: ChatCompletionRequest, klass: RequestClass) -> Prepared:
    check_model(c, body.model)
    prompt = chat_prompt_ids(c.tokenizer, body)
    params = sampling_params(
        body,
        len(prompt),
        c.max_model_len,
        requested_max_tokens(body),
        body.top_logprobs or 0 if body.logprobs else None,
    )
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    fmt = ChatFormat(rid, c, body, _tier(body, klass))
    return Prepared(rid, [prompt], [params], klass, bool(body.stream), fmt)


def prepare_completion(c: EngineClient, body: CompletionRequest, klass: RequestClass) -> Prepared:
    check_model(c, body.model)
    prompts = split_prompts(body.prompt, c.tokenizer)
    params = [
        sampling_params(body, len(p), c.max_model_len, requested_max_tokens(body), body.logprobs)
        for p in prompts
    ]
    rid = f"cmpl-{uuid.uuid4().hex}"
    fmt = CompletionFormat(rid, c, body, _tier(body, klass))
    return Prepared(rid, prompts, params, klass, bool(body.stream), fmt)


def _tier(body, klass: RequestClass) -> str:
    return body.service_tier or ("flex" if klass == RequestClass.OFFLINE else "default")


ENDPOINTS = {
    "/v1/chat/completions": (ChatCompletionRequest, prepare_chat),
    "/v1/completions": (CompletionRequest, prepare_completion),
}


@dataclass(frozen=True)
class LineShape:
    """What the batch planner needs of a request body: its first prompt as the endpoint
    tokenizes it, its output bound, how many sequences it runs, and whether the output length
    is known exactly (ignore_eos, or min_tokens up to the bound)."""

    prompt_ids: list[int]
    max_tokens: int
    copies: int  # prompts x n
    exact: bool


def line_shape(
    tokenizer: Tokenizer, max_model_len: int, endpoint: str, raw: Any
) -> LineShape | None:
    """The shape of a batch line's body, tokenized exactly as `answer` would; None when the
    body is invalid (the endpoint answers it with an error, at no cost)."""
    model_cls, _ = ENDPOINTS[endpoint]
    try:
        body = model_cls.model_validate(raw)
        if isinstance(body, ChatCompletionRequest):
            prompts = [chat_prompt_ids(tokenizer, body)]
        else:
            prompts = split_prompts(body.prompt, tokenizer)
    except (ValidationError, OpenAIError, ValueError, TypeError):
        return None
    first = prompts[0]
    bound = requested_max_tokens(body)
    max_tokens = max(1, max_model_len - len(first) if bound is None else bound)
    exact = body.ignore_eos or body.min_tokens >= max_tokens
    return LineShape(first, max_tokens, len(prompts) * body.n, exact)


def start_streams(state: ServerState, c: EngineClient, p: Prepared) -> list[AsyncIterator]:
    return [
        tracked(state, p.klass, c.generate(f"{p.rid}-{i}", ids, sp, p.klass, p.stream))
        for i, (ids, sp) in enumerate(zip(p.prompts, p.params, strict=True))
    ]


async def collect_all(streams: list[AsyncIterator[RequestDelta]]) -> list[list[RequestDelta]]:
    """Every stream's deltas; if one fails or the caller is cancelled, the others are
    cancelled too (which aborts their requests)."""
    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def answer(
    state: ServerState,
    c: EngineClient,
    endpoint: str,
    raw: Any,
    klass: RequestClass = RequestClass.OFFLINE,
) -> tuple[int, dict[str, Any]]:
    """A request body (as JSON-decoded) -> (HTTP status, response or error body), exactly as
    `POST endpoint` would answer it without streaming. Used by batch lines. Raises
    EngineDeadError when the engine is gone (there is no answer to record then)."""
    model_cls, prepare = ENDPOINTS[endpoint]
    try:
        try:
            body = model_cls.model_validate(raw)
        except ValidationError as e:
            raise validation_error(e.errors()) from e
        if body.stream:
            raise OpenAIError(400, "stream: streaming is not available in a batch", param="stream")
        log_unknown(state, body)
        p = prepare(c, body, klass)
        if not c.alive:
            raise EngineDeadError(c.dead_reason or "the engine core is not running")
        finals = await collect_all(start_streams(state, c, p))
        return 200, p.fmt.full(finals, len(p.prompts))
    except OpenAIError as e:
        return e.status, e.body()
    except EngineDeadError:
        raise
    except ValueError as e:  # the engine rejected the request
        return 400, OpenAIError(400, str(e)).body()


class _QueueSlot:
    """One request counted in `state.queued` from its admission until its first token."""

    def __init__(self, state: ServerState, klass: RequestClass) -> None:
        self.state, self.klass, self.held = state, klass, True
        state.queued[klass] += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.queued[self.klass] -= 1


def tracked(
    state: ServerState, klass: RequestClass, stream: AsyncIterator[RequestDelta]
) -> AsyncIterator[RequestDelta]:
    """`stream`, counted as queued from now until its first token, and timed for the metrics.
    The count starts at once, not when the stream is first read: requests of a burst are
    admitted one after the other in the event loop, and each must see the ones before it. A
    stream that is never read gives its count back when it is dropped."""
    slot = _QueueSlot(state, klass)
    gen = _tracked(state, klass, stream, slot)
    weakref.finalize(gen, slot.release)
    return gen


async def _tracked(
    state: ServerState,
    klass: RequestClass,
    stream: AsyncIterator[RequestDelta],
    slot: _QueueSlot,
) -> AsyncIterator[RequestDelta]:
    timer = RequestTimer(state.metrics, klass.value)
    state.in_flight += 1
    try:
        async for d in stream:
            n = sum(len(s.token_ids) for s in d.seqs)
            if n:
                slot.release()
            timer.on_delta(n)
            if d.finished:
                reasons = [s.finish_reason for s in d.seqs if s.finish_reason]
                timer.on_finish(
                    d.num_prompt_tokens, d.num_generated_tokens, reasons[0] if reasons else None
                )
            yield d
    finally:
        slot.release()
        state.in_flight -= 1
        await stream.aclose()


def request_class(body) -> RequestClass:
    if body.service_tier == "flex" or (body.priority or 0) > 0:
        return RequestClass.OFFLINE
    return RequestClass.ONLINE


def sampling_params(
    body, prompt_len: int, max_model_len: int, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise OpenAIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt "
            f"has {prompt_len} tokens and {max_tokens} more were requested",
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop or (),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=logprobs,
        )
    except ValueError as e:
        raise OpenAIError(400, str(e), param=str(e).split(" ", 1)[0]) from e


def split_prompts(prompt, tokenizer: Tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    out = []
    for item in items:
        ids = tokenizer.encode(item) if isinstance(item, str) else [int(t) for t in item]
        if not ids:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        if any(t < 0 or t >= tokenizer.vocab_size for t in ids):
            raise OpenAIError(400, "prompt token ids out of range", param="prompt")
        out.append(ids)
    return out


async def until_disconnected(request: Request, work: asyncio.Future, poll_s: float = 0.5):
    """Await `work`, cancelling it (which aborts its requests) if the client disconnects."""
    work = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({work}, timeout=poll_s)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return None


async def collect(stream: AsyncIterator[RequestDelta]) -> list[RequestDelta]:
    return [d async for d in stream]


async def sse(
    request: Request, streams: list[AsyncIterator[RequestDelta]], fmt
) -> AsyncIterator[str]:
    """Server-sent events: the first chunk carries the role, then text deltas, then an optional
    usage chunk and [DONE]. An error after streaming began becomes an error event."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestDelta]) -> None:
        try:
            async for d in s:
                await queue.put((i, d))
        except Exception as e:  # noqa: BLE001 - forwarded to the client as an error event
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for chunk in fmt.first_chunks(len(streams)):
            yield f"data: {json.dumps(chunk)}\n\n"
        open_streams = len(streams)
        finals: list[RequestDelta | None] = [None] * len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, Exception):
                err = OpenAIError(
                    500 if isinstance(item, EngineDeadError) else 400,
                    str(item),
                    "server_error"
                    if isinstance(item, EngineDeadError)
                    else "invalid_request_error",
                )
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            finals[i] = item
            for chunk in fmt.delta_chunks(i, item):
                yield f"data: {json.dumps(chunk)}\n\n"
        else:
            usage = fmt.body.stream_options and fmt.body.stream_options.include_usage
            if usage:
                yield f"data: {json.dumps(fmt.usage_chunk(finals))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # A client that went away lands here too: cancelling the pumps closes their request
        # streams, which abort the requests in the engine (their KV blocks are freed at once).
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


class _Format:
    object_full = ""
    object_chunk = ""

    def __init__(self, rid: str, client: EngineClient, body, tier: str) -> None:
        self.rid, self.client, self.body, self.tier = rid, client, body, tier
        self.created = int(time.time())
        self.n = body.n

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.client.model_name,
            "service_tier": self.tier,
        }

    def usage(self, finals: list) -> dict[str, int]:
        prompt = sum(f.num_prompt_tokens for f in finals if f is not None)
        gen = sum(f.num_generated_tokens for f in finals if f is not None)
        cached = sum(f.num_cached_tokens for f in finals if f is not None)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": gen,
            "total_tokens": prompt + gen,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def usage_chunk(self, finals: list) -> dict[str, Any]:
        return self._head(self.object_chunk) | {"choices": [], "usage": self.usage(finals)}

    def full(self, per_prompt: list[list[RequestDelta]], num_prompts: int) -> dict[str, Any]:
        choices = []
        for p, deltas in enumerate(per_prompt):
            for seq in range(self.n):
                parts = [s for d in deltas for s in d.seqs if s.index == seq]
                text = "".join(s.text for s in parts)
                ids = [t for s in parts for t in s.token_ids]
                lps = [e for s in parts for e in (s.logprobs or [])]
                finish = parts[-1].finish_reason if parts else None
                choices.append(self.choice(p * self.n + seq, text, ids, lps, finish))
        finals = [d[-1] for d in per_prompt]
        return self._head(self.object_full) | {"choices": choices, "usage": self.usage(finals)}

    def token_str(self, token_id: int) -> str:
        return self.client.tokenizer.token_text(token_id)


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


class ChatFormat(_Format):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def logprobs(self, entries: list) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None

        def item(tid: int, lp: float) -> dict[str, Any]:
            tok = self.token_str(tid)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

        return {
            "content": [
                item(e.token_id, e.logprob) | {"top_logprobs": [item(t, v) for t, v in e.top]}
                for e in entries
            ]
        }

    def choice(self, index: int, text: str, ids: list[int], lps: list, finish) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": self.logprobs(lps),
            "finish_reason": _finish(finish),
        }

    def first_chunks(self, num_prompts: int) -> list[dict[str, Any]]:
        return [
            self._head(self.object_chunk)
            | {
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            }
            for i in range(num_prompts * self.n)
        ]

    def delta_chunks(self, prompt_idx: int, d: RequestDelta) -> list[dict[str, Any]]:
        out = []
        for s in d.seqs:
            if not s.text and not s.finish_reason and not s.logprobs:
                continue
            out.append(
                self._head(self.object_chunk)
                | {
                    "choices": [
                        {
                            "index": prompt_idx * self.n + s.index,
                            "delta": {"content": s.text},
                            "logprobs": self.logprobs(s.logprobs or []),
                            "finish_reason": _finish(s.finish_reason),
                        }
                    ]
                }
            )
        return out


class CompletionFormat(_Format):
    object_full = "text_completion"
    object_chunk = "text_completion"

    def logprobs(self, entries: list, offset0: int = 0) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        tokens = [self.token_str(e.token_id) for e in entries]
        offsets, pos = [], offset0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token_str(t): v for t, v in e.top} for e in entries],
            "text_offset": offsets,
        }

    def choice(self, index: int, text: str, ids: list[int], lps: list, finish) -> dict:
        return {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(lps),
            "finish_reason": _finish(finish),
        }

    def first_chunks(self, num_prompts: int) -> list[dict[str, Any]]:
        return []

    def delta_chunks(self, prompt_idx: int, d: RequestDelta) -> list[dict[str, Any]]:
        out = []
        for s in d.seqs:
            if not s.text and not s.finish_reason:
                continue
            out.append(
                self._head(self.object_chunk)
                | {
                    "choices": [
                        self.choice(
                            prompt_idx * self.n + s.index,
                            s.text,
                            s.token_ids,
                            s.logprobs or [],
                            s.finish_reason,
                        )
                    ]
                }
            )
        return out
