"""Server-sent events of a streamed response, and waiting on work while its client stays."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from starlette.requests import Request

from conserve.core.client import EngineDeadError
from conserve.core.messages import RequestDelta
from conserve.openai.errors import OpenAIError
from conserve.openai.formats import ResponseFormat


async def until_disconnected(request: Request, work: Awaitable[Any], poll_s: float = 0.5) -> Any:
    """Await `work`, cancelling it (which aborts its requests) if the client disconnects;
    None then."""
    work = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({work}, timeout=poll_s)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return None


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def engine_failed(exc: EngineDeadError) -> str:
    """The message of a request the engine core's death ended (the server restarts the core,
    so the request can be sent again)."""
    return f"the engine failed: {exc}; retry the request"


def _error_event(exc: Exception) -> str:
    if isinstance(exc, EngineDeadError):
        err = OpenAIError(503, engine_failed(exc), "server_error")
    else:
        err = OpenAIError(400, str(exc), "invalid_request_error")
    return _event(err.body())


async def sse(
    request: Request, streams: list[AsyncIterator[RequestDelta]], fmt: ResponseFormat
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
            yield _event(chunk)
        open_streams = len(streams)
        finals: list[RequestDelta | None] = [None] * len(streams)
        opts = fmt.body.stream_options
        running_usage = bool(opts and opts.include_usage and opts.continuous_usage_stats)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, Exception):
                yield _error_event(item)
                break
            finals[i] = item
            for chunk in fmt.delta_chunks(i, item):
                if running_usage:
                    chunk["usage"] = fmt.usage(finals)
                yield _event(chunk)
        else:
            if opts and opts.include_usage:
                yield _event(fmt.usage_chunk(finals))
        yield "data: [DONE]\n\n"
    finally:
        # A client that went away lands here too: cancelling the pumps closes their request
        # streams, which abort the requests in the engine (their KV blocks are freed at once).
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
