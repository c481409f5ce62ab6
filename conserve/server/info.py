"""Routes about the server itself: /health, /version, /v1/models, /metrics and /debug/kv."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from conserve.core.client import EngineDeadError
from conserve.core.messages import Stats
from conserve.openai.errors import OpenAIError
from conserve.server.state import ServerState
from conserve.version import __version__


def info_routes(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        c = state.engine()
        extra = {"replicas": c.health()} if c.on_ray else {}
        if not c.alive:
            restarting = state.restarting or getattr(c, "restarting", False)
            status = "restarting" if restarting else "engine dead"
            return JSONResponse({"status": status, **extra}, status_code=503)
        if state.draining:  # shutting down: finishing what runs, taking nothing new
            return JSONResponse({"status": "draining", **extra}, status_code=503)
        return JSONResponse({"status": "ok", "engine_pid": c.pid, **extra})

    @router.get("/version")
    async def version() -> dict[str, Any]:
        """The version, and the scheduling policy with its online objectives: absolute TTFT and
        TPOT in seconds (null: relative, "as if alone") and the slack of relative ones."""
        c = state.client
        if c is None:
            return {"version": __version__}
        return {
            "version": __version__,
            "policy": c.policy,
            "ttft_slo": c.ttft_slo,
            "tpot_slo": c.tpot_slo,
            "slo_slack": c.slo_slack,
        }

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        c = state.engine()
        model = {
            "id": c.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "conserve",
            "max_model_len": c.max_model_len,
        }
        return {"object": "list", "data": [model]}

    @router.get("/debug/kv")
    async def debug_kv() -> dict[str, Any]:
        """KV and queue state, and the engine's integrity check (null when it holds)."""
        s = await _engine_stats(state)
        if s is None:
            raise OpenAIError(503, "the engine is not running or did not answer", "server_error")
        state.metrics.update_engine(s)
        return {
            "running": s.running,
            "waiting": s.waiting,
            "kv_usage": s.kv_usage,
            "kv_tables": s.kv_tables,
            "integrity_error": s.integrity_error,
        }

    @router.get("/metrics")
    async def metrics() -> Response:
        s = await _engine_stats(state)
        if s is not None:  # else: the last snapshot (the engine restarts, or is busy)
            state.metrics.update_engine(s)
        c = state.engine()
        if c.on_ray:
            state.metrics.update_replicas(c.replica_snapshots())
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


async def _engine_stats(state: ServerState) -> Stats | None:
    """The engine's stats snapshot; None when the engine is dead or did not answer in time."""
    c = state.engine()
    if not c.alive:
        return None
    try:
        return await c.stats()
    except (TimeoutError, EngineDeadError):
        return None
