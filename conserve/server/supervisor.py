"""The engine supervisor: when the engine core process dies (killed, out of memory, a crash in
a native kernel), it starts a new one, with a growing pause between repeated failures.

While it restarts, `/health` answers 503 "restarting" and new requests get a retryable 503;
requests that were in flight have already been failed by the dead client (each with an OpenAI
error object). Once the new core is up, `on_restart` resumes what depends on it (the Batch
API's unfinished batches, from their durable state)."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from conserve.config import EngineConfig
from conserve.core.client import EngineClient
from conserve.server.state import ServerState

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Pauses before restart attempts: `first` seconds, doubled after each failure up to
    `cap`; back to `first` once the engine ran `healthy_s` seconds without failing."""

    first: float = 1.0
    cap: float = 60.0
    healthy_s: float = 120.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._next = self.first
        self._last_failure: float | None = None

    def pause(self) -> float:
        """The pause before the next attempt; call once per failure."""
        now = self.clock()
        if self._last_failure is not None and now - self._last_failure >= self.healthy_s:
            self._next = self.first
        self._last_failure = now
        pause, self._next = self._next, min(self._next * 2, self.cap)
        return pause


class EngineFactory:
    """Builds engine clients from one config. The first start measures or loads the latency
    profile as configured; a restart reuses the profile the engine was running with (a crash
    must not cost a new measurement, nor a different model of step times), and the tokenizer
    the API process already has."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._profile: Path | None = None
        self._tokenizer = None  # the first client's, reused: loading it again takes seconds

    def __call__(self) -> EngineClient:
        client = EngineClient(self.config, tokenizer=self._tokenizer)
        self._tokenizer = client.tokenizer
        if client.latency_profile and self.config.latency_profile == "auto":
            self._keep_profile(client.latency_profile)
        return client

    def _keep_profile(self, text: str) -> None:
        if self._profile is None:
            fd, name = tempfile.mkstemp(prefix="conserve-profile-", suffix=".json")
            os.close(fd)
            self._profile = Path(name)
        self._profile.write_text(text)
        self.config = replace(self.config, latency_profile=str(self._profile))

    def close(self) -> None:
        if self._profile is not None:
            self._profile.unlink(missing_ok=True)


class EngineSupervisor:
    """Watches `state.client`; replaces a dead one with `factory()` (run in a worker thread),
    then awaits `on_restart(new_client)`. Not while the server drains."""

    def __init__(
        self,
        state: ServerState,
        factory: Callable[[], EngineClient],
        on_restart: Callable[[EngineClient], Awaitable[None]] | None = None,
        backoff: Backoff | None = None,
        poll_s: float = 0.25,
    ) -> None:
        self.state, self.factory, self.on_restart = state, factory, on_restart
        self.backoff = backoff or Backoff()
        self.poll_s = poll_s
        self._task: asyncio.Task | None = None
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="engine-supervisor")

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.poll_s)
            client = self.state.client
            if client is None or client.alive or self.state.draining:
                continue
            await self._restart(client)

    async def _restart(self, dead: EngineClient) -> None:
        state = self.state
        state.restarting = True
        log.error("the engine core died (%s): restarting it", dead.dead_reason or "exited")
        await asyncio.to_thread(dead.shutdown, 1.0)
        while not self._stopped and not state.draining:
            pause = self.backoff.pause()
            log.warning("starting a new engine core in %.0f s", pause)
            await asyncio.sleep(pause)
            try:
                client = await asyncio.to_thread(self.factory)
            except Exception:  # noqa: BLE001 - any failure to start is retried after a pause
                log.exception("the new engine core failed to start")
                continue
            if self._stopped:  # the server stopped while the core started
                await asyncio.to_thread(client.shutdown)
                return
            client.start(asyncio.get_running_loop())
            state.client = client
            state.restarting = False
            state.metrics.engine_restarts.inc()
            log.warning("engine core restarted (pid %d)", client.pid)
            if self.on_restart is not None:
                await self.on_restart(client)
            return
