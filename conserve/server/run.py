"""Run the API server: uvicorn with a draining shutdown."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn

from conserve.config import EngineConfig
from conserve.core.client import EngineClient
from conserve.server.app import create_app
from conserve.server.state import ServerSettings, ServerState
from conserve.server.supervisor import EngineFactory


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: answer new API requests with 503, let running ones finish (up to the
    timeout), then exit. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, timeout_s: float) -> None:
        super().__init__(config)
        self.state, self.timeout_s = state, timeout_s

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:
            return super().handle_exit(sig, frame)
        self.state.draining = True

        def wait() -> None:
            deadline = time.monotonic() + self.timeout_s
            while self.state.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True

        threading.Thread(target=wait, name="drain", daemon=True).start()


def serve(
    config: EngineConfig,
    settings: ServerSettings,
    host: str,
    port: int,
    shutdown_timeout_s: float,
    verbose: bool = False,
    client_factory: Callable[[], EngineClient] | None = None,
) -> None:
    """`client_factory`: builds the engine client (default: one engine process, restarted by
    the supervisor when it dies)."""
    state = ServerState()
    app = create_app(client_factory or EngineFactory(config), settings, state)
    uv = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning")
    DrainingServer(uv, state, shutdown_timeout_s).run()
