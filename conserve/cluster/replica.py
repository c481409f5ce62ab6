"""The replica actor: one engine core inside a Ray actor process.

The core loop is `conserve.core.process.serve_core`, the one `conserve serve` runs in its child
process. Ray places the actor and restarts it when its process dies (the control plane); the
messages themselves (requests, aborts, per-step deltas) go over a direct connection: the actor
listens on its node's address, the front door connects with a per-set key, and both ends use
the same `multiprocessing.connection` calls as the local pipe. So the data path costs what a
local socket costs, and a lost actor is seen the moment its socket closes.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import replace
from multiprocessing.connection import Listener
from pathlib import Path

from conserve.config import EngineConfig
from conserve.core.process import serve_core


def for_replica(config: EngineConfig, index: int) -> EngineConfig:
    """The files one engine owns, made per replica: the host tier's directory (one engine
    per directory) gets a `replica-<i>` subdirectory, the step log a `.replica<i>` infix."""
    if config.cache.host_kv_path:
        path = str(Path(config.cache.host_kv_path) / f"replica-{index}")
        config = replace(config, cache=replace(config.cache, host_kv_path=path))
    if config.step_log:
        log = Path(config.step_log)
        config = replace(
            config, step_log=str(log.with_name(f"{log.stem}.replica{index}{log.suffix}"))
        )
    return config


class Replica:
    """Actor body (wrapped by `ray.remote` in `launch.py`). `profile_text`: a latency profile
    (JSON) to plan with, from the replica that measured or loaded it; written to a local file,
    since the actor may run on another machine than the front door. `authkey`: the key the
    front door connects with."""

    def __init__(
        self,
        config: EngineConfig,
        index: int,
        profile_text: str | None,
        authkey: bytes,
        host: str | None = None,
    ) -> None:
        self.index = index
        config = for_replica(config, index)
        if profile_text is not None:
            fd, path = tempfile.mkstemp(prefix=f"conserve-replica{index}-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(profile_text)
            config = replace(config, latency_profile=path)
        self.listener = Listener((host or _node_address(), 0), authkey=authkey)
        self.core = threading.Thread(
            target=self._serve, args=(config,), name="engine-core", daemon=True
        )
        self.core.start()

    def _serve(self, config: EngineConfig) -> None:
        """Wait for the front door, then run the engine core loop on its connection (the
        engine is built first: its Ready message is the first the front door reads)."""
        conn = self.listener.accept()
        self.listener.close()
        serve_core(config, conn)
        conn.close()

    def address(self) -> tuple[str, int]:
        return self.listener.address

    def pid(self) -> int:
        return os.getpid()


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()
