"""The front door's end of a replica: an `EngineClient` transport over a Ray actor handle.

Sends are fire-and-forget actor calls, numbered so the actor takes them in order; receiving is a
long poll (`Replica.recv`) that returns everything the core sent since the last one. A lost actor
surfaces as EOFError from `recv`, as a dead pipe does for a local core.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from typing import Any

from conserve.core.messages import Failed

log = logging.getLogger(__name__)

POLL_S = 1.0  # longest wait of one `recv` call on the actor


def ray_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the actor is gone or unreachable"."""
    import ray.exceptions as rx

    return (rx.RayActorError, rx.ActorUnavailableError, rx.RayTaskError, rx.GetTimeoutError)


class RayTransport:
    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self._seq = itertools.count()
        self._buffer: deque[Any] = deque()
        self._dead = threading.Event()
        self._pid: int | None = None

    def first(self, timeout_s: float) -> Any:
        import ray

        try:
            self._pid = ray.get(self.actor.pid.remote(), timeout=timeout_s)
            while True:  # the core sends Ready (or Failed) once the engine is built
                msgs = ray.get(self.actor.recv.options(concurrency_group="outbox").remote(POLL_S))
                if msgs:
                    self._buffer.extend(msgs[1:])
                    return msgs[0]
        except ray_errors() as e:
            return Failed(f"the replica is unreachable: {type(e).__name__}: {e}")

    def send(self, msg: Any) -> None:
        if self._dead.is_set():
            raise OSError("the replica is gone")
        self.actor.send.options(concurrency_group="inbox").remote(next(self._seq), msg)

    def recv(self) -> Any:
        import ray

        while not self._buffer:
            if self._dead.is_set():
                raise EOFError("the replica is closed")
            try:
                call = self.actor.recv.options(concurrency_group="outbox").remote(POLL_S)
                self._buffer.extend(ray.get(call, timeout=POLL_S + 30))
            except ray_errors() as e:
                self._dead.set()
                raise EOFError(f"the replica was lost ({type(e).__name__})") from e
        return self._buffer.popleft()

    def is_alive(self) -> bool:
        return not self._dead.is_set()

    @property
    def pid(self) -> int | None:
        return self._pid

    def close(self, timeout_s: float) -> None:
        """Stop the core loop (the actor itself is killed by the ReplicaSet)."""
        import ray

        if self._dead.is_set():
            return
        self._dead.set()
        try:
            ray.get(self.actor.stop.remote(timeout_s), timeout=timeout_s + 5)
        except ray_errors():
            pass

    def kill(self) -> None:
        self._dead.set()
