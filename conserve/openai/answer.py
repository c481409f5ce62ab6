"""A prepared request run in the engine: its delta streams, and the endpoint's non-streaming
JSON body. The HTTP server (requests without `stream`) and the batch runner both answer here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from conserve.core.messages import RequestDelta
from conserve.openai.formats import ResponseFormat, response_format
from conserve.openai.prepare import Prepared
from conserve.openai.served import Backend, Track, untracked


def start_streams(
    backend: Backend, p: Prepared, rid: str, track: Track = untracked
) -> list[AsyncIterator[RequestDelta]]:
    """One delta stream per prompt (engine request ids `rid-0`, `rid-1`, ...), each handed to
    `track` now: the serving side counts them from this moment, not from the first read."""
    return [
        track(p.klass, backend.generate(f"{rid}-{i}", ids, sp, p.klass, p.stream, p.received))
        for i, (ids, sp) in enumerate(zip(p.prompts, p.params, strict=True))
    ]


async def collect(stream: AsyncIterator[RequestDelta]) -> list[RequestDelta]:
    return [d async for d in stream]


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


def answer(
    backend: Backend, p: Prepared, track: Track = untracked
) -> Coroutine[Any, Any, dict[str, Any]]:
    """The endpoint's JSON body for `p` (as without streaming), to await. The requests are
    handed to `track` before this returns, so a burst admitted in one event-loop turn counts
    every request of it. Awaiting raises what the engine raises: ValueError when it rejects a
    request, `EngineDeadError` when it is gone."""
    fmt = response_format(p, backend)
    return _full_body(fmt, start_streams(backend, p, fmt.rid, track), len(p.prompts))


async def _full_body(
    fmt: ResponseFormat, streams: list[AsyncIterator[RequestDelta]], num_prompts: int
) -> dict[str, Any]:
    return fmt.full(await collect_all(streams), num_prompts)
