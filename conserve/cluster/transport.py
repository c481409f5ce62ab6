"""The front door's end of a replica: an `EngineClient` transport to an engine core in a Ray
actor. Ray gives the actor's address and process id; the messages go over a direct connection
(`multiprocessing.connection`, authenticated by the set's key), as over the local pipe. A lost
actor closes the socket: `recv` raises EOFError at once."""

from __future__ import annotations

from multiprocessing.connection import Client, Connection
from typing import Any

from conserve.core.messages import Failed, Shutdown


def ray_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the actor is gone or unreachable"."""
    import ray.exceptions as rx

    return (rx.RayActorError, rx.ActorUnavailableError, rx.RayTaskError, rx.GetTimeoutError)


class RayTransport:
    def __init__(self, actor: Any, authkey: bytes) -> None:
        self.actor, self.authkey = actor, authkey
        self.conn: Connection | None = None
        self._pid: int | None = None
        self._dead = False
        self.address: str | None = None  # host:port of the replica's end (its node's address)

    def first(self, timeout_s: float) -> Any:
        import ray

        try:
            address = ray.get(self.actor.address.remote(), timeout=timeout_s)
            self.address = f"{address[0]}:{address[1]}"
            self._pid = ray.get(self.actor.pid.remote(), timeout=timeout_s)
        except ray_errors() as e:
            return Failed(f"the replica is unreachable: {type(e).__name__}: {e}")
        try:
            self.conn = Client(tuple(address), authkey=self.authkey)
            # the core sends Ready (or Failed) once the engine is built
            return self.conn.recv() if self.conn.poll(timeout_s) else None
        except (OSError, EOFError) as e:
            return Failed(f"the replica's connection failed: {type(e).__name__}: {e}")

    def send(self, msg: Any) -> None:
        if self.conn is None or self._dead:
            raise OSError("the replica is gone")
        self.conn.send(msg)

    def recv(self) -> Any:
        if self.conn is None:
            raise EOFError("not connected")
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self._dead = True
            raise

    def is_alive(self) -> bool:
        return self.conn is not None and not self._dead

    @property
    def pid(self) -> int | None:
        return self._pid

    def close(self, timeout_s: float) -> None:
        """Ask the core loop to stop (the ReplicaSet kills the actor afterwards)."""
        if self.conn is None or self._dead:
            return
        try:
            self.conn.send(Shutdown())
            self.conn.poll(timeout_s)  # the core closes its end when its loop has ended
        except (OSError, EOFError):
            pass
        self._dead = True
        self.conn.close()

    def kill(self) -> None:
        self._dead = True
        if self.conn is not None:
            self.conn.close()
