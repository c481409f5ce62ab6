"""The OpenAI-compatible HTTP app (FastAPI). Runs in the API process; the engine runs in the
engine core process behind `EngineClient`. The OpenAI logic itself is `conserve.openai`; this
module mounts the routes, maps errors to responses and guards every request."""

from __future__ import annotations

import asyncio
import gc
import hmac
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conserve.core.client import EngineClient
from conserve.openai.errors import OpenAIError, validation_error
from conserve.server.batch_routes import batch_api_routes, start_batches
from conserve.server.completions import completion_routes
from conserve.server.dashboard import dashboard_routes
from conserve.server.info import info_routes
from conserve.server.state import ServerSettings, ServerState
from conserve.server.supervisor import EngineSupervisor
from conserve.version import __version__


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(
    client_factory: Callable[[], EngineClient],
    settings: ServerSettings,
    state: ServerState | None = None,
) -> FastAPI:
    """`client_factory()` builds the EngineClient (it starts the engine core)."""
    state = state or ServerState()
    app = FastAPI(
        title="conserve", version=__version__, lifespan=_lifespan(client_factory, settings, state)
    )
    app.state.conserve = state
    _install_error_handlers(app)
    _install_guard(app, settings, state)
    app.include_router(info_routes(state))
    app.include_router(completion_routes(state, settings))
    app.include_router(dashboard_routes(state))
    if settings.data_dir is not None:
        app.include_router(batch_api_routes(state, settings))
    return app


def startup_line(client: EngineClient) -> str:
    """The line printed once the engine is up: model, policy and its online objectives."""
    slos = []
    for name, value in (("TTFT", client.ttft_slo), ("TPOT", client.tpot_slo)):
        if value is not None:
            slos.append(f"{name} {value:g} s")
        elif client.slo_slack is not None:
            slos.append(f"{name} as if alone +{client.slo_slack:.0%}")
    slo = f", online SLOs: {', '.join(slos)}" if slos else ""
    n = client.num_replicas
    on = f", {n} replica{'s' if n > 1 else ''} on Ray" if client.on_ray else ""
    return f"conserve: model {client.model_name}, policy {client.policy}{slo}{on}"


def _lifespan(
    client_factory: Callable[[], EngineClient], settings: ServerSettings, state: ServerState
):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = client_factory()
        client.start(asyncio.get_running_loop())
        state.client = client
        print(startup_line(client), file=sys.stderr, flush=True)
        if state.batches is not None:
            await start_batches(state, client, settings)
        supervisor = None
        # replicas on Ray are restarted by Ray, and followed by their ReplicaSet
        if settings.restart_engine and not client.on_ray:
            supervisor = EngineSupervisor(state, client_factory, _resume(state, settings))
            supervisor.start()
        # What start-up made (imports, the tokenizer) lives as long as the server: out of the
        # garbage collector's sight. A full collection walked 236,000 such objects in 68-122
        # ms on a 2-core CPU (benchmarks/results/gc-pause-20261203.txt); an online request
        # that arrived or got its first token meanwhile waited for it.
        gc.collect()
        gc.freeze()
        yield
        if supervisor is not None:
            await supervisor.stop()
        if state.batches is not None:
            await state.batches.stop()
        state.engine().shutdown()
        close = getattr(client_factory, "close", None)
        if close is not None:
            close()

    return lifespan


def _resume(state: ServerState, settings: ServerSettings):
    """What a restarted engine takes over: the unfinished batches."""

    async def on_restart(client: EngineClient) -> None:
        if state.batches is not None:
            await start_batches(state, client, settings)

    return on_restart


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is answered as an OpenAI error object."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(OpenAIError(exc.status_code, str(exc.detail), kind))


def _install_guard(app: FastAPI, settings: ServerSettings, state: ServerState) -> None:
    """Before any route: the body size cap, 503 while draining, the API key on /v1/."""

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        request.state.received = time.monotonic()  # the request's arrival, for the step log
        if request.method == "POST" and request.url.path.startswith("/v1/"):
            # until the route knows whether this one is online, offline output waits and the
            # engine's door is open (ServerState.arrive)
            state.arrive(request)
            try:
                return await _checked(request, call_next)
            finally:
                state.classified(request)
        return await _checked(request, call_next)

    async def _checked(request: Request, call_next):
        size = request.headers.get("content-length")
        upload = request.method == "POST" and request.url.path == "/v1/files"
        cap = settings.max_file_bytes + (64 << 10) if upload else settings.max_body_bytes
        if size is not None and size.isdigit() and int(size) > cap:
            return error_response(
                OpenAIError(413, f"request body over {cap} bytes", code="body_too_large")
            )
        if state.draining and request.url.path.startswith("/v1/"):
            return error_response(OpenAIError(503, "the server is shutting down", "server_error"))
        if settings.api_key and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
                return error_response(
                    OpenAIError(
                        401,
                        "missing or wrong API key",
                        "authentication_error",
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)
