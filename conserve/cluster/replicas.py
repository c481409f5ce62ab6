"""ReplicaSet: N engine replicas on Ray behind one front door, used wherever one EngineClient
is (the server, the Batch API, `batch run`, `bench offline`).

Each replica is an `EngineClient` over a `RayTransport`. A request goes where the `Router`
says; if its replica is lost before the request sent anything, it runs again on another one,
else it fails with `ReplicaLost` (the Batch API then runs the line again: a line's result is
written only once it is complete). Ray restarts a lost replica's actor; the set's watcher
reconnects to it and routing avoids it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from conserve.cluster import launch
from conserve.cluster.merge import merge_stats
from conserve.cluster.router import ReplicaLoad, Router
from conserve.cluster.transport import RayTransport
from conserve.config import EngineConfig
from conserve.core.client import EngineClient, EngineDeadError, ReplicaLost
from conserve.core.messages import RequestDelta, Stats
from conserve.engine.latency import LatencyModel
from conserve.engine.request import RequestClass
from conserve.model.loader import resolve_model
from conserve.model.tokenizer import Tokenizer
from conserve.sampling.params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One replica as the front door sees it."""

    index: int
    actor: Any
    client: EngineClient | None = None
    state: str = "starting"  # starting | up | restarting | stopped
    restarts: int = 0
    stats: Stats | None = None  # its latest snapshot


class ReplicaSet:
    on_ray = True  # Ray restarts its replicas, the set reconnects: no engine supervisor

    def __init__(
        self,
        config: EngineConfig,
        replicas: int,
        ray_address: str | None = None,
        startup_timeout_s: float = 600,
        wait_for_replica_s: float = 600,
    ) -> None:
        """Starts (or joins) Ray and the replicas; returns once all are ready. `config` is one
        replica's (its `num_threads` are the CPUs each gets)."""
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.wait_for_replica_s = wait_for_replica_s
        self.tokenizer = Tokenizer.load(resolve_model(config.model))
        self._owns_ray = launch.connect(ray_address, replicas * (config.num_threads or 1))
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: threading.Thread | None = None
        self._changed = asyncio.Event()
        profile = _profile_text(config)
        self._authkey = os.urandom(32)  # what the front door connects to its replicas with
        self.slots = [Slot(0, launch.create_replica(config, 0, profile, self._authkey))]
        try:
            first = self._connect(self.slots[0])  # it measures or loads the latency profile
            self._describe(first)
            profile = profile or first.latency_profile
            self.slots += [
                Slot(i, launch.create_replica(config, i, profile, self._authkey))
                for i in range(1, replicas)
            ]
            with ThreadPoolExecutor(max(1, replicas - 1)) as pool:
                list(pool.map(self._connect, self.slots[1:]))
        except BaseException:
            self.shutdown()
            raise
        self.loads = [ReplicaLoad() for _ in self.slots]
        for slot in self.slots:
            self._set_up(slot)
        self.router = Router(self.loads, config.cache.block_size)

    # -- what the server and the batch code read of an engine client -----------------------
    def _describe(self, c: EngineClient) -> None:
        self.model_name, self.max_model_len = c.model_name, c.max_model_len
        self.num_kv_blocks = c.num_kv_blocks
        self.policy, self.tpot_slo, self.ttft_slo = c.policy, c.tpot_slo, c.ttft_slo
        self.slo_slack, self.latency_profile = c.slo_slack, c.latency_profile
        self.model_config, self.dtype, self.device = c.model_config, c.dtype, c.device

    @property
    def num_replicas(self) -> int:
        return len(self.slots)

    @property
    def alive(self) -> bool:
        return not self._closed and any(s.state == "up" for s in self.slots)

    @property
    def restarting(self) -> bool:
        return not self._closed and any(s.state in ("starting", "restarting") for s in self.slots)

    @property
    def dead_reason(self) -> str | None:
        return None if self.alive else "no engine replica is running"

    @property
    def pid(self) -> int | None:
        return None

    def health(self) -> list[dict[str, Any]]:
        return [
            {
                "replica": s.index,
                "status": s.state,
                "pid": s.client.pid if s.client is not None else None,
                "address": getattr(s.client.transport, "address", None) if s.client else None,
                "restarts": s.restarts,
            }
            for s in self.slots
        ]

    # -- life ---------------------------------------------------------------------------------
    def _connect(self, slot: Slot) -> EngineClient:
        client = EngineClient(
            self.config,
            startup_timeout_s=self.startup_timeout_s,
            tokenizer=self.tokenizer,
            transport=RayTransport(slot.actor, self._authkey),
        )
        slot.client = client
        if self._loop is not None:
            client.start(self._loop)
        return client

    def _set_up(self, slot: Slot) -> None:
        assert slot.client is not None
        load = self.loads[slot.index]  # its counts return to zero as its requests end
        load.up = True
        if slot.client.latency_profile:
            load.model = LatencyModel.from_json(json.loads(slot.client.latency_profile))
        slot.state = "up"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for slot in self.slots:
            assert slot.client is not None
            slot.client.start(loop)
        self._watcher = threading.Thread(target=self._watch, name="replica-watch", daemon=True)
        self._watcher.start()

    def _watch(self, poll_s: float = 0.25) -> None:
        """Replace the client of every replica that died with one connected to the actor Ray
        restarts (a replica is killed first if its actor may still run: it restarts clean)."""
        while not self._closed:
            time.sleep(poll_s)
            for slot in self.slots:
                if slot.state == "up" and slot.client is not None and not slot.client.alive:
                    self._restart(slot)

    def _restart(self, slot: Slot) -> None:
        if self._closed:
            return
        slot.state, slot.restarts = "restarting", slot.restarts + 1
        self.loads[slot.index].up = False
        log.error("engine replica %d was lost: %s", slot.index, slot.client.dead_reason)
        if launch.same_process(slot.actor, slot.client.pid):
            launch.kill(slot.actor, restart=True)  # its core stopped, its actor did not
        pause = 1.0
        while not self._closed:
            try:
                self._connect(slot)
                self._set_up(slot)
                log.warning("engine replica %d is back (pid %s)", slot.index, slot.client.pid)
                self._notify()
                return
            except EngineDeadError as e:
                log.error("engine replica %d did not restart: %s", slot.index, e)
                time.sleep(pause)
                pause = min(pause * 2, 60)

    def _notify(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed.set)

    def shutdown(self, timeout_s: float = 10) -> None:
        self._closed = True
        for slot in self.slots:
            if slot.client is not None:
                slot.client.shutdown(timeout_s)
            launch.kill(slot.actor, restart=False)
            slot.state = "stopped"
        if self._owns_ray:
            launch.shutdown()

    # -- requests -----------------------------------------------------------------------------
    async def _pick(self, klass: RequestClass, prompt: list[int]) -> Slot:
        """The replica to run a request on. While every replica restarts, an online request
        fails at once (a retryable 503, as with one engine); offline work waits for one."""
        deadline = time.monotonic() + self.wait_for_replica_s
        while True:
            i = self.router.pick(klass, prompt)
            if i is not None:
                return self.slots[i]
            if self._closed or klass is RequestClass.ONLINE or time.monotonic() > deadline:
                raise EngineDeadError("no engine replica is running")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=1.0)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_class: RequestClass,
        stream: bool,
        received: float | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Deltas of one request from the replica the router picks; run again elsewhere if that
        replica is lost before the request sent anything."""
        attempts = 0
        while True:
            slot = await self._pick(request_class, prompt_token_ids)
            client = slot.client
            assert client is not None
            sent = False
            with _Counted(self.loads[slot.index], request_class, len(prompt_token_ids)) as load:
                inner = client.generate(
                    request_id, prompt_token_ids, params, request_class, stream, received
                )
                try:
                    async for delta in inner:
                        load.first_token()
                        sent = True
                        yield delta
                    return
                except EngineDeadError as e:
                    if not client.alive:  # route nothing more there until it is back
                        self.loads[slot.index].up = False
                    if sent or attempts >= len(self.slots):
                        raise ReplicaLost(f"engine replica {slot.index} was lost: {e}") from e
                    attempts += 1
                    log.warning("request %s runs again: replica %d lost", request_id, slot.index)
                finally:
                    await inner.aclose()

    async def stats(self) -> Stats:
        """All answering replicas' stats in one; each replica's kept on its slot."""
        up = [s for s in self.slots if s.state == "up" and s.client is not None]

        async def one(slot: Slot) -> Stats | None:
            try:
                slot.stats = await slot.client.stats()
            except (TimeoutError, EngineDeadError):
                return None
            return slot.stats

        got = await asyncio.gather(*(one(s) for s in up))
        parts = [(st, s.client.num_kv_blocks) for s, st in zip(up, got, strict=True) if st]
        if not parts:
            raise EngineDeadError("no engine replica answered")
        return merge_stats(parts)

    def replica_snapshots(self) -> list[dict[str, Any]]:
        """Per replica: state, restarts, requests routed per class, latest stats (or None)."""
        return [
            {
                "replica": s.index,
                "up": s.state == "up",
                "restarts": s.restarts,
                "routed": dict(self.loads[s.index].routed),
                "stats": s.stats if s.state == "up" else None,
            }
            for s in self.slots
        ]


class _Counted:
    """A request's share of its replica's load, from routing to its end."""

    def __init__(self, load: ReplicaLoad, klass: RequestClass, prompt_len: int) -> None:
        self.load, self.online = load, klass is RequestClass.ONLINE
        self.prompt_len, self.queued = prompt_len, self.online

    def __enter__(self) -> _Counted:
        if self.online:
            self.load.online_queued_tokens += self.prompt_len
            self.load.online_running += 1
        else:
            self.load.offline_in_flight += 1
        return self

    def first_token(self) -> None:
        if self.queued:
            self.queued = False
            self.load.online_queued_tokens -= self.prompt_len

    def __exit__(self, *exc: object) -> None:
        self.first_token()
        if self.online:
            self.load.online_running -= 1
        else:
            self.load.offline_in_flight -= 1


def _profile_text(config: EngineConfig) -> str | None:
    """The latency profile file's text, when the config names one (replicas may run on other
    machines: they get the text, not the path)."""
    path = config.latency_profile
    if path in (None, "auto", "none", ""):
        return None
    return Path(path).read_text()


def replica_config(config: EngineConfig, replicas: int) -> EngineConfig:
    """One replica's config: unless --threads says otherwise, the machine's cores shared out."""
    if config.num_threads:
        return config
    return replace(config, num_threads=max(1, (os.cpu_count() or 1) // replicas))
