"""/v1/chat/completions and /v1/completions: admission (engine up, queue limit), then the
answer as one JSON body or as server-sent events."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from conserve.core.client import EngineDeadError
from conserve.engine.request import RequestClass
from conserve.openai.answer import answer, start_streams
from conserve.openai.errors import OpenAIError
from conserve.openai.formats import response_format
from conserve.openai.prepare import Prepared, prepare, request_class
from conserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from conserve.server.state import ServerSettings, ServerState
from conserve.server.streaming import engine_failed, sse, until_disconnected


def completion_routes(state: ServerState, settings: ServerSettings) -> APIRouter:
    router = APIRouter()

    def admit(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Prepared:
        """The body validated and tokenized, stamped with the request's arrival; from here
        the request no longer counts as arriving (its class is known)."""
        state.unknown_fields.log(body)
        p = prepare(state.engine(), body, request_class(body))
        p.received = getattr(request.state, "received", None)
        state.classified(request, online=p.klass is RequestClass.ONLINE)
        return p

    @router.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await respond(state, settings, request, admit(body, request))

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await respond(state, settings, request, admit(body, request))

    return router


def queue_full(state: ServerState, settings: ServerSettings, p: Prepared) -> Response | None:
    """The 429 answer when admitting `p` would pass its class's queue limit, else None."""
    if state.queued[p.klass] + len(p.prompts) <= settings.queue_limit(p.klass):
        return None
    err = OpenAIError(
        429,
        f"too many queued {p.klass.value} requests; retry later",
        "rate_limit_error",
        code="queue_full",
    )
    return JSONResponse(err.body(), status_code=429, headers={"Retry-After": "1"})


async def respond(
    state: ServerState, settings: ServerSettings, request: Request, p: Prepared
) -> Response:
    c = state.engine()
    if not c.alive:
        why = "restarting" if state.restarting else "not running"
        raise OpenAIError(503, f"the engine is {why}; retry later", "server_error")
    refused = queue_full(state, settings, p)
    if refused is not None:
        return refused
    if p.stream:
        fmt = response_format(p, c)
        streams = start_streams(c, p, fmt.rid, state.track)
        return StreamingResponse(sse(request, streams, fmt), media_type="text/event-stream")
    try:
        body = await until_disconnected(request, answer(c, p, state.track))
        if body is None:  # the client left: its requests are aborted
            return Response(status_code=499)
    except EngineDeadError as e:
        raise OpenAIError(503, engine_failed(e), "server_error") from e
    except ValueError as e:
        raise OpenAIError(400, str(e)) from e
    return JSONResponse(body)
