"""The replica actor: one engine core inside a Ray actor process.

The core loop is `conserve.core.process.serve_core`, the one `conserve serve` runs in its child
process; instead of a pipe it reads an inbox and writes an outbox that the front door fills and
drains through actor methods (`send`, `recv`). Methods run in separate concurrency groups of one
thread each, so messages keep their order and a long poll never blocks a send.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from conserve.config import EngineConfig
from conserve.core.messages import Shutdown
from conserve.core.process import serve_core


class QueueConn:
    """The core's end of the connection: `recv` reads the inbox, `send` writes the outbox."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send(self, msg: Any) -> None:
        self.outbox.put(msg)

    def recv(self) -> Any:
        return self.inbox.get()

    def take(self, timeout_s: float) -> list[Any]:
        """Every message in the outbox, waiting up to `timeout_s` for the first one."""
        try:
            out = [self.outbox.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self.outbox.get_nowait())
            except queue.Empty:
                return out


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
    since the actor may run on another machine than the front door."""

    def __init__(self, config: EngineConfig, index: int, profile_text: str | None) -> None:
        self.index = index
        config = for_replica(config, index)
        if profile_text is not None:
            fd, path = tempfile.mkstemp(prefix=f"conserve-replica{index}-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(profile_text)
            config = replace(config, latency_profile=path)
        self.conn = QueueConn()
        self._lock = threading.Lock()
        self._next = 0  # sequence number of the next message for the inbox
        self._early: dict[int, Any] = {}  # messages that overtook an earlier one
        self.core = threading.Thread(
            target=serve_core, args=(config, self.conn), name="engine-core", daemon=True
        )
        self.core.start()

    def pid(self) -> int:
        return os.getpid()

    def send(self, seq: int, msg: Any) -> None:
        """Message `seq` (numbered from 0 by the front door) for the core, taken in order even
        if calls overtake each other."""
        with self._lock:
            self._early[seq] = msg
            while self._next in self._early:
                self.conn.inbox.put(self._early.pop(self._next))
                self._next += 1

    def recv(self, timeout_s: float = 1.0) -> list[Any]:
        """What the core sent since the last call (waits up to `timeout_s` for something)."""
        return self.conn.take(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the core loop; True when it ended in time."""
        self.conn.inbox.put(Shutdown())
        self.core.join(timeout_s)
        return not self.core.is_alive()
