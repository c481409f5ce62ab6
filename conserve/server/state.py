"""The API process's settings and mutable state, and how a request's stream is counted in it
(queued until its first token, in flight until it ends, timed for the metrics)."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from conserve.core.client import EngineClient
from conserve.core.messages import RequestDelta
from conserve.engine.request import RequestClass
from conserve.openai.protocol import UnknownFields
from conserve.server.metrics import Metrics, RequestTimer
from conserve.server.recent import RecentRequests

if TYPE_CHECKING:
    from conserve.batch.manager import BatchManager


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
    # start a new engine core when it dies (conserve.server.supervisor)
    restart_engine: bool = True

    def queue_limit(self, klass: RequestClass) -> int:
        return self.max_queued_online if klass == RequestClass.ONLINE else self.max_queued_offline


class ServerState:
    """Mutable state of the API process: the engine client, metrics, admission counters."""

    def __init__(self) -> None:
        self._client: EngineClient | None = None
        # requests the HTTP server has received and not yet classified (online or offline):
        # offline output waits while there are any (`EngineClient.hold_offline`)
        self.arriving = 0
        self.metrics = Metrics()
        self.unknown_fields = UnknownFields()
        self.queued = {RequestClass.ONLINE: 0, RequestClass.OFFLINE: 0}
        self.in_flight = 0
        self.draining = False
        self.restarting = False  # the engine core died and a new one is starting
        self.batches: BatchManager | None = None  # the Batch API, when a data dir is given
        self.recent = RecentRequests()  # finished requests, timed (the dashboard's latencies)

    @property
    def client(self) -> EngineClient | None:
        return self._client

    @client.setter
    def client(self, client: EngineClient | None) -> None:
        self._client = client
        if client is not None and hasattr(client, "hold_offline"):
            client.hold_offline = lambda: self.arriving > 0

    def engine(self) -> EngineClient:
        """The engine client (set while the app runs)."""
        assert self._client is not None
        return self._client

    def arrive(self, request) -> None:
        """The request (a Starlette request) may be online until `classified`: it counts as
        arriving, and the first one arriving opens the engine's door (`Engine.door`)."""
        request.state.arriving = True
        self.arriving += 1
        if self.arriving == 1:
            self._door(True)

    def classified(self, request, online: bool = False) -> None:
        """The request is known to be online or offline now (or failed): it no longer counts
        as arriving; the last one closes the door, unless it is online: then the engine closes
        it when the request reaches it, so that the stopped offline step does not resume in
        between."""
        if getattr(request.state, "arriving", False):
            request.state.arriving = False
            self.arriving -= 1
            if self.arriving == 0 and not online:
                self._door(False)

    def _door(self, open_: bool) -> None:
        door = getattr(self._client, "door", None)  # replicas on Ray: no door
        if door is not None:
            door(open_)

    def track(
        self, klass: RequestClass, stream: AsyncIterator[RequestDelta]
    ) -> AsyncIterator[RequestDelta]:
        """The openai layer's Track: `stream` counted in this state (see `tracked`)."""
        return tracked(self, klass, stream)


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
    first = last = None
    state.in_flight += 1
    try:
        async for d in stream:
            n = sum(len(s.token_ids) for s in d.seqs)
            if n:
                slot.release()
                last = time.monotonic()
                first = first or last
            timer.on_delta(n)
            if d.finished:
                reasons = [s.finish_reason for s in d.seqs if s.finish_reason]
                timer.on_finish(
                    d.num_prompt_tokens, d.num_generated_tokens, reasons[0] if reasons else None
                )
                state.recent.add(klass.value, timer.start, first, last, d.num_generated_tokens)
            yield d
    finally:
        slot.release()
        state.in_flight -= 1
        await stream.aclose()
