"""`GET /dashboard`: a live page of what co-serving achieves, and `GET /dashboard/data`, the JSON
it polls (docs/dashboard.md describes the shape).

The API process keeps a bounded history: one snapshot of the engine's counters per second at
most, taken when the data is asked for, for 15 minutes. Windowed figures compare the newest
snapshot with an older one (the engine's counters are cumulative, and all zero when the server
started, which serves as the oldest snapshot); latency percentiles come from the requests the
API process timed (`ServerState.recent`)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from conserve.core.client import EngineDeadError
from conserve.core.messages import Stats
from conserve.engine.policy import policy_class
from conserve.server.recent import PERCENTILES, Finished, latency_summary
from conserve.server.state import ServerState
from conserve.version import __version__

HISTORY_S = 900.0  # snapshots kept this long
SNAPSHOT_EVERY_S = 1.0  # at most one snapshot per this many seconds
LATENCY_WINDOW_S = 60.0  # each history point: percentiles and attainment over this window
RATE_WINDOW_S = 30.0  # each history point: tokens per second over this window
ETA_WINDOW_S = 60.0  # a batch's lines per second over this window
BATCH_ROWS = 20  # the newest batches shown
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(frozen=True)
class Counters:
    """The engine's cumulative counters at `mono` (`time.monotonic()`)."""

    mono: float
    objectives: dict[str, tuple[int, int]] = field(default_factory=dict)
    online_busy_s: float = 0.0
    offline_only_busy_s: float = 0.0
    offline_only_tokens: int = 0
    offline_computed_tokens: int = 0
    engines: int = 1  # busy seconds are summed over this many engines (replicas)

    @staticmethod
    def of(stats: Stats, mono: float) -> Counters:
        return Counters(
            mono,
            dict(stats.online_objectives),
            stats.online_busy_s,
            stats.offline_only_busy_s,
            stats.offline_only_tokens,
            stats.offline_computed_tokens,
            stats.engines,
        )

    def plus(self, base: Counters) -> Counters:
        """These counters with `base` added: an engine restarted from zero continues the
        counts of the one before it."""
        zero = (0, 0)
        objectives = {}
        for k in set(self.objectives) | set(base.objectives):
            (a_met, a_missed), (b_met, b_missed) = (
                self.objectives.get(k, zero),
                base.objectives.get(k, zero),
            )
            objectives[k] = (a_met + b_met, a_missed + b_missed)
        return Counters(
            self.mono,
            objectives,
            self.online_busy_s + base.online_busy_s,
            self.offline_only_busy_s + base.offline_only_busy_s,
            self.offline_only_tokens + base.offline_only_tokens,
            self.offline_computed_tokens + base.offline_computed_tokens,
            self.engines,
        )


@dataclass(frozen=True)
class Snapshot:
    t: float  # wall-clock seconds
    counters: Counters
    stats: Stats
    point: dict[str, Any]  # the history point drawn for it


# -- windowed figures (plain functions over counters; unit-tested with made-up numbers) --------
def baseline(history: Sequence[Counters], now: float, window: float) -> Counters:
    """The counters a window of `window` seconds ending at `now` starts from: the newest taken
    at least `window` seconds before `now`, else the oldest there is (a shorter window)."""
    older = [c for c in history if c.mono <= now - window]
    return older[-1] if older else history[0]


def attainment(new: Counters, old: Counters) -> dict[str, dict[str, Any]]:
    """Per objective: sequences that met it and missed it between `old` and `new`, and the
    share that met it (None when none was counted)."""
    out = {}
    for objective in ("ttft", "tpot"):
        met, missed = new.objectives.get(objective, (0, 0))
        met0, missed0 = old.objectives.get(objective, (0, 0))
        met, missed = met - met0, missed - missed0
        share = met / (met + missed) if met + missed else None
        out[objective] = {"met": met, "missed": missed, "attainment": share}
    return out


def harvest(new: Counters, old: Counters) -> dict[str, float | None]:
    """Offline tokens per second between `old` and `new`, and the ceiling: the offline-only
    rate (tokens per busy second of steps with offline work only, in the window, or since the
    start when the window had none) times the share of the window that online work left,
    for each engine (replicas: busy time is summed over them, the ceiling too)."""
    span = new.mono - old.mono
    if span <= 0:
        return {"offline_tokens_per_s": None, "ceiling_tokens_per_s": None, "online_busy": None}
    engines = max(1, new.engines)
    online_busy = min(1.0, max(0.0, (new.online_busy_s - old.online_busy_s) / (span * engines)))
    busy = new.offline_only_busy_s - old.offline_only_busy_s
    tokens = new.offline_only_tokens - old.offline_only_tokens
    if busy <= 0 or tokens <= 0:
        busy, tokens = new.offline_only_busy_s, new.offline_only_tokens
    rate_alone = tokens / busy if busy > 0 and tokens > 0 else None
    return {
        "offline_tokens_per_s": (new.offline_computed_tokens - old.offline_computed_tokens) / span,
        "ceiling_tokens_per_s": (
            None if rate_alone is None else rate_alone * engines * (1 - online_busy)
        ),
        "online_busy": online_busy,
    }


def eta_seconds(progress: Sequence[tuple[float, int]], total: int, window: float) -> float | None:
    """Seconds left for a batch at the rate of its last `window` seconds of `progress`
    ((monotonic time, lines done) pairs, oldest first); None without progress to go by."""
    if not progress:
        return None
    now, done = progress[-1]
    if done >= total:
        return 0.0
    recent = [p for p in progress if p[0] >= now - window] or [progress[-1]]
    t0, done0 = recent[0]
    if done <= done0 or now <= t0:
        return None
    return (total - done) / ((done - done0) / (now - t0))


def history_point(
    t: float, new: Counters, history: Sequence[Counters], recent: Sequence[Finished], stats: Stats
) -> dict[str, Any]:
    """One point of the page's time series at wall time `t`: latency percentiles and
    attainment over the last LATENCY_WINDOW_S, tokens per second over the last RATE_WINDOW_S,
    and the gauges."""
    lat = latency_summary(recent)
    point: dict[str, Any] = {"t": round(t, 3)}
    for kind in ("ttft", "tpot"):
        for p in PERCENTILES:
            point[f"{kind}_p{p}"] = _round(lat[kind][f"p{p}"])
    for objective, a in attainment(new, baseline(history, new.mono, LATENCY_WINDOW_S)).items():
        point[f"{objective}_attainment"] = _round(a["attainment"])
    h = harvest(new, baseline(history, new.mono, RATE_WINDOW_S))
    point["offline_tps"] = _round(h["offline_tokens_per_s"], 1)
    point["ceiling_tps"] = _round(h["ceiling_tokens_per_s"], 1)
    point["kv_usage"] = _round(stats.kv_usage)
    point["host_kv_usage"] = _round(stats.host_kv_usage)
    point["preemptions"] = dict(stats.preemptions_by_kind)
    return point


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# -- the state kept between requests -----------------------------------------------------------
class Dashboard:
    """The history of one server's snapshots and the batches' progress."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.zero = Counters(time.monotonic())  # every engine counter starts at zero
        self.snapshots: deque[Snapshot] = deque()
        self.progress: dict[str, deque[tuple[float, int]]] = {}
        self._lock = asyncio.Lock()
        # the engine the counters come from; after a restart the new one's counts start at
        # zero and are added to what the old one had reached at the last snapshot
        self._engine: object | None = None
        self._carry = Counters(0.0)

    def counters(self) -> list[Counters]:
        return [self.zero, *(s.counters for s in self.snapshots)]

    async def snapshot(self) -> Snapshot | None:
        """The newest snapshot, a new one if the last is SNAPSHOT_EVERY_S old; None while the
        engine has never answered."""
        async with self._lock:
            last = self.snapshots[-1] if self.snapshots else None
            client = self.state.client
            fresh = last is not None and time.monotonic() - last.counters.mono < SNAPSHOT_EVERY_S
            if fresh or client is None or not client.alive:
                return last
            try:
                stats = await client.stats()
            except (EngineDeadError, TimeoutError):
                return last
            self.state.metrics.update_engine(stats)  # the step times it drained count there
            if client is not self._engine:
                if self._engine is not None and last is not None:
                    self._carry = last.counters
                self._engine = client
            mono, t = time.monotonic(), time.time()
            if last is not None and t <= last.t:
                t = last.t + 0.001  # strictly increasing: clients ask for points after one
            new = Counters.of(stats, mono).plus(self._carry)
            recent = self.state.recent.window(LATENCY_WINDOW_S, mono)
            snap = Snapshot(t, new, stats, history_point(t, new, self.counters(), recent, stats))
            self.snapshots.append(snap)
            while self.snapshots and self.snapshots[0].counters.mono < mono - HISTORY_S:
                self.snapshots.popleft()
            return snap

    async def data(self, since: float | None, window: float) -> dict[str, Any]:
        snap = await self.snapshot()
        state, now = self.state, time.monotonic()
        client = state.client
        out: dict[str, Any] = {
            "time": time.time(),
            "engine_alive": client is not None and client.alive,
            "server": server_info(state),
            "window_s": window,
            "online": latency_summary(state.recent.window(window, now)),
            "offline": {
                "requests": sum(1 for f in state.recent.window(window, now) if f.klass == "offline")
            },
            "batches": self.batches(now),
            "history": [s.point for s in self.snapshots if since is None or s.point["t"] > since],
        }
        if snap is None:
            return out
        counters = self.counters()
        old = baseline(counters, snap.counters.mono, window)
        s = snap.stats
        out["objectives"] = attainment(snap.counters, old)
        out["objectives_total"] = attainment(snap.counters, self.zero)
        out["offline"].update(harvest(snap.counters, old))
        out["kv"] = {"device_usage": s.kv_usage, "host_usage": s.host_kv_usage}
        out["queues"] = {k: {"running": r, "waiting": w} for k, (r, w) in s.by_class.items()}
        out["preemptions"] = dict(s.preemptions_by_kind)
        return out

    def batches(self, now: float) -> list[dict[str, Any]] | None:
        """The newest batches with their progress (None: the server has no Batch API)."""
        manager = self.state.batches
        if manager is None:
            return None
        rows, _ = manager.store.list_batches(limit=BATCH_ROWS)
        out = []
        for b in rows:
            c = b.counts
            done = c.completed + c.failed
            eta = None
            if b.status in ACTIVE:
                seen = self.progress.setdefault(b.id, deque(maxlen=600))
                if not seen or seen[-1][0] < now - 0.5:
                    seen.append((now, done))
                eta = eta_seconds(seen, c.total, ETA_WINDOW_S) if c.total else None
            else:
                self.progress.pop(b.id, None)
            out.append(
                {
                    "id": b.id,
                    "status": b.status,
                    "total": c.total,
                    "completed": c.completed,
                    "failed": c.failed,
                    "eta_s": _round(eta, 1),
                    "created_at": b.created_at,
                }
            )
        return out


def server_info(state: ServerState) -> dict[str, Any]:
    """The version, model, policy and the online objectives in force (as `/version` and the
    start-up line tell them)."""
    c = state.client
    info: dict[str, Any] = {"version": __version__, "batch_api": state.batches is not None}
    if c is None:
        return info
    host_tier = policy_class(c.policy).uses_host_tier and c.config.cache.host_kv_gb > 0
    info.update(
        model=c.model_name,
        policy=c.policy,
        ttft_slo=c.ttft_slo,
        tpot_slo=c.tpot_slo,
        slo_slack=c.slo_slack,
        objectives=describe_objectives(c.ttft_slo, c.tpot_slo, c.slo_slack),
        host_tier=host_tier,
    )
    return info


def describe_objectives(ttft: float | None, tpot: float | None, slack: float | None) -> str:
    """E.g. "TTFT 0.5 s, TPOT as if alone +5%"; "none" for a policy without objectives."""
    parts = []
    for name, value in (("TTFT", ttft), ("TPOT", tpot)):
        if value is not None:
            parts.append(f"{name} {value:g} s")
        elif slack is not None:
            parts.append(f"{name} as if alone +{slack:.0%}")
    return ", ".join(parts) or "none"


@cache
def page_html() -> str:
    """The page, shipped as package data."""
    return (resources.files("conserve.server") / "static" / "dashboard.html").read_text("utf-8")


def dashboard_routes(state: ServerState) -> APIRouter:
    board = Dashboard(state)
    router = APIRouter()

    @router.get("/dashboard", response_class=HTMLResponse)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(page_html())

    @router.get("/dashboard/data")
    async def dashboard_data(
        since: float | None = None,
        window: float = Query(300.0, ge=10.0, le=HISTORY_S),
    ) -> dict[str, Any]:
        """The figures over the last `window` seconds, and the history points newer than
        `since` (wall-clock seconds; all of them without it)."""
        return await board.data(since, window)

    return router
