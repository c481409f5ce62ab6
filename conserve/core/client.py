"""API-process side of the engine core: sends requests, routes step outputs to waiting
coroutines, aborts requests whose client went away."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from conserve.config import EngineConfig
from conserve.core.messages import (
    Abort,
    AddRequest,
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


class EngineDeadError(RuntimeError):
    pass


class EngineClient:
    def __init__(
        self,
        config: EngineConfig,
        startup_timeout_s: float = 600,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """Starts the engine core for `config`; `tokenizer`: the model's, when the caller has
        it loaded already (a restart), else loaded here."""
        self.config = config
        self.tokenizer = tokenizer or Tokenizer.load(resolve_model(config.model))
        self.proc, self.conn = start_core(config)
        if not self.conn.poll(startup_timeout_s):
            self.proc.kill()
            raise EngineDeadError("the engine core did not start in time")
        ready = self.conn.recv()
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
        return self.dead_reason is None and self.proc.is_alive()

    def _send(self, msg: Any) -> None:
        if not self.alive:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        with self._send_lock:
            self.conn.send(msg)

    def _read_loop(self) -> None:
        assert self._loop is not None
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self._die("the engine core exited")
                return
            if isinstance(msg, list):
                for delta in msg:
                    q = self._queues.get(delta.request_id)
                    if q is not None:
                        self._loop.call_soon_threadsafe(q.put_nowait, delta)
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
    ) -> AsyncIterator[RequestDelta]:
        """Deltas of one request until it finishes. Leaving early (client gone) aborts it."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            self._send(AddRequest(request_id, prompt_token_ids, params, request_class, stream))
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
            if not finished and self.alive:
                self._send(Abort([request_id]))

    async def stats(self) -> Stats:
        assert self._loop is not None
        fut = self._loop.create_future()
        self._stats.append(fut)
        self._send("stats")
        return await asyncio.wait_for(fut, timeout=10)

    def shutdown(self, timeout_s: float = 10) -> None:
        if self.proc.is_alive():
            try:
                with self._send_lock:
                    self.conn.send(Shutdown())
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
