"""API-process side of the engine core: sends requests, routes step outputs to waiting
coroutines, aborts requests whose client went away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from conserve.config import EngineConfig
from conserve.core.messages import (
    Abort,
    AddRequest,
    Door,
    Failed,
    Ready,
    Rejected,
    RequestDelta,
    Shutdown,
    Stats,
)
from conserve.core.process import start_core
from conserve.engine.request import RequestClass
from conserve.model.loader import resolve_model
from conserve.model.tokenizer import Tokenizer
from conserve.sampling.params import SamplingParams

log = logging.getLogger(__name__)
# Offline deltas reach their requests' coroutines at most this many per turn of the event
# loop: the engine sends held offline outputs in bursts (hundreds of requests at once, see
# `core.process`), and the coroutines they wake would otherwise all run before the loop reads
# its sockets again, so an online request arriving meanwhile would wait for the whole burst.
OFFLINE_DISPATCH_SLICE = 16
# While an online request is in flight, offline deltas already received wait (at most this
# long, then they go on, a slice per turn): their streaming work would share the cores with
# the engine steps computing the online request. The engine core holds the offline outputs of
# its later steps meanwhile (`core.process`); this covers those sent just before it arrived.
OFFLINE_DEFER_S = 2.0
OFFLINE_DEFER_POLL_S = 0.005


class EngineDeadError(RuntimeError):
    pass


class ReplicaLost(EngineDeadError):
    """The engine replica running a request was lost, while other replicas may still run it:
    work that can be done again (a batch line, a request that sent nothing yet) is retried."""


class Transport(Protocol):
    """How an EngineClient reaches its engine core: a pipe to a child process here, a Ray
    actor in `conserve.cluster`. Messages are those of `conserve.core.messages`."""

    def first(self, timeout_s: float) -> Any:
        """The core's first message (Ready or Failed); None when none came in time."""
        ...

    def send(self, msg: Any) -> None: ...

    def recv(self) -> Any:
        """The next message; raises EOFError or OSError once the core is gone."""
        ...

    def is_alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    def close(self, timeout_s: float) -> None:
        """Ask the core to stop; kill it if it has not after `timeout_s`."""
        ...

    def kill(self) -> None: ...


class PipeTransport:
    """The engine core as a child process of this one, over a duplex pipe."""

    def __init__(self, config: EngineConfig) -> None:
        self.proc, self.conn = start_core(config)

    def first(self, timeout_s: float) -> Any:
        return self.conn.recv() if self.conn.poll(timeout_s) else None

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def recv(self) -> Any:
        return self.conn.recv()

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def close(self, timeout_s: float) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(Shutdown())
            self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()

    def kill(self) -> None:
        self.proc.kill()


class EngineClient:
    num_replicas = 1  # engines behind this client (a ReplicaSet has several)
    on_ray = False  # a ReplicaSet (conserve.cluster) is: per-replica health and metrics

    def __init__(
        self,
        config: EngineConfig,
        startup_timeout_s: float = 600,
        tokenizer: Tokenizer | None = None,
        transport: Transport | None = None,
    ) -> None:
        """Starts the engine core for `config` (in a child process, unless `transport` reaches
        one started elsewhere); `tokenizer`: the model's, when the caller has it loaded already
        (a restart), else loaded here."""
        self.config = config
        self.tokenizer = tokenizer or Tokenizer.load(resolve_model(config.model))
        self.transport = transport or PipeTransport(config)
        ready = self.transport.first(startup_timeout_s)
        if ready is None:
            self.transport.kill()
            raise EngineDeadError("the engine core did not start in time")
        if isinstance(ready, Failed):
            raise EngineDeadError(f"the engine core failed to start: {ready.message}")
        assert isinstance(ready, Ready)
        self.model_name = ready.model_name
        self.max_model_len = ready.max_model_len
        self.num_kv_blocks = ready.num_kv_blocks
        self.policy = ready.policy
        self.tpot_slo = ready.tpot_slo
        self.ttft_slo = ready.ttft_slo
        self.slo_slack = ready.slo_slack
        self.latency_profile = ready.latency_profile
        self.model_config, self.dtype, self.device = ready.model_config, ready.dtype, ready.device
        self._queues: dict[str, asyncio.Queue] = {}
        self._offline: set[str] = set()  # requests of `_queues` that are offline
        self._offline_deltas: deque[RequestDelta] = deque()  # not yet in their queues
        self._online = 0  # online requests in flight
        # True while offline output should wait for a request on its way in (set by the HTTP
        # server: a request it has received but not yet classified may be online)
        self.hold_offline: Callable[[], bool] = lambda: False
        self._deferred_since: float | None = None  # when offline dispatch began to wait
        self._stats: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        self.dead_reason: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="core-reader", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.transport.is_alive()

    @property
    def pid(self) -> int | None:
        """The engine core's process id (on its own machine, for a remote core)."""
        return self.transport.pid

    def door(self, open_: bool) -> None:
        """Tell the engine core whether requests of a class not known yet are arriving."""
        with contextlib.suppress(EngineDeadError, OSError):  # no engine: the request will say
            self._send(Door(open_))

    def _send(self, msg: Any) -> None:
        if not self.alive:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        with self._send_lock:
            self.transport.send(msg)

    def _read_loop(self) -> None:
        assert self._loop is not None
        while True:
            try:
                msg = self.transport.recv()
            except (EOFError, OSError):
                self._die("the engine core exited")
                return
            if isinstance(msg, list):
                # one wake-up of the event loop per message, not per delta (an offline step's
                # message holds hundreds)
                self._loop.call_soon_threadsafe(self._dispatch, msg)
            elif isinstance(msg, Rejected):
                q = self._queues.get(msg.request_id)
                if q is not None:
                    self._loop.call_soon_threadsafe(q.put_nowait, ValueError(msg.message))
            elif isinstance(msg, Stats):
                waiters, self._stats = self._stats, []
                for fut in waiters:
                    self._loop.call_soon_threadsafe(_set_result, fut, msg)
            elif isinstance(msg, Failed):
                log.error("%s", msg.message)
                self._die(msg.message)
                return

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        """In the event loop: each delta to its request's queue; online ones at once, offline
        ones in arrival order, OFFLINE_DISPATCH_SLICE per turn of the loop."""
        draining = bool(self._offline_deltas)
        for delta in deltas:
            if delta.request_id in self._offline:
                self._offline_deltas.append(delta)
                continue
            q = self._queues.get(delta.request_id)
            if q is not None:
                q.put_nowait(delta)
        if self._offline_deltas and not draining:
            self._drain_offline()

    def _drain_offline(self) -> None:
        """A slice of the waiting offline deltas to their queues; the rest in a later turn of
        the event loop, one that reads the sockets first. While an online request is in
        flight, or one is on its way in (`hold_offline`), they wait instead, up to
        OFFLINE_DEFER_S."""
        pending = self._offline_deltas
        if pending and (self._online or self.hold_offline()):
            now = self._loop.time()
            if self._deferred_since is None:
                self._deferred_since = now
            if now - self._deferred_since < OFFLINE_DEFER_S:
                self._loop.call_later(OFFLINE_DEFER_POLL_S, self._drain_offline)
                return
        else:
            self._deferred_since = None
        for _ in range(min(len(pending), OFFLINE_DISPATCH_SLICE)):
            delta = pending.popleft()
            q = self._queues.get(delta.request_id)
            if q is not None:
                q.put_nowait(delta)
        if pending:
            self._loop.call_soon(self._drain_offline)

    def _die(self, reason: str) -> None:
        self.dead_reason = reason
        err = EngineDeadError(reason)
        for q in list(self._queues.values()):
            self._loop.call_soon_threadsafe(q.put_nowait, err)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_class: RequestClass,
        stream: bool,
        received: float | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Deltas of one request until it finishes. Leaving early (client gone) aborts it."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        online = request_class is not RequestClass.OFFLINE
        if online:
            self._online += 1
        else:
            self._offline.add(request_id)
        finished = False
        try:
            add = AddRequest(
                request_id,
                prompt_token_ids,
                params,
                request_class,
                stream,
                received=received,
                sent=time.monotonic(),
            )
            self._send(add)
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            del self._queues[request_id]
            self._offline.discard(request_id)
            if online:
                self._online -= 1
            if not finished and self.alive:
                self._send(Abort([request_id]))

    async def stats(self) -> Stats:
        assert self._loop is not None
        fut = self._loop.create_future()
        self._stats.append(fut)
        self._send("stats")
        return await asyncio.wait_for(fut, timeout=10)

    def shutdown(self, timeout_s: float = 10) -> None:
        with self._send_lock:
            self.transport.close(timeout_s)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
