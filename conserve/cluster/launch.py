"""Starting or joining a Ray cluster, and creating replica actors on it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

from conserve.cluster.replica import Replica
from conserve.config import EngineConfig
from conserve.engine_args import ConfigError

log = logging.getLogger(__name__)

LOCAL = "local"  # --ray-address local: a Ray instance of this process's own, on loopback


class RayMissingError(ConfigError):
    pass


def import_ray(local: bool = False) -> Any:
    """Ray, imported. `local`: for a Ray instance of this process only; then Ray keeps every
    address on loopback (by default it advertises the machine's outward address, so that
    other machines could join), unless the environment says otherwise."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as e:
        raise RayMissingError(
            "replicas run on Ray, which is not installed: pip install 'conserve-llm[ray]'"
        ) from e
    return ray


def connect(address: str | None, cpus_needed: int) -> bool:
    """Join the cluster at `address` ("auto": the one `ray start` runs on this machine), or
    start a local instance on the loopback address when `address` is None or "local". True
    when this process started Ray (and so stops it at the end)."""
    ray = import_ray(local=address in (None, LOCAL))
    if ray.is_initialized():
        return False
    with _own_signal_handlers():
        return _init(ray, address, cpus_needed)


@contextlib.contextmanager
def _own_signal_handlers():
    """Keep this process's SIGTERM / SIGINT handlers (the server's draining shutdown): the
    Ray driver installs its own, which exit at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _init(ray: Any, address: str | None, cpus_needed: int) -> bool:
    if address in (None, LOCAL):
        cpus = os.cpu_count() or 1
        if cpus_needed > cpus:
            log.warning(
                "%d replica threads on %d CPUs: replicas will compete for cores", cpus_needed, cpus
            )
        ray.init(
            num_cpus=max(cpus, cpus_needed),
            include_dashboard=False,
            configure_logging=False,
        )
        return True
    ray.init(address=address, configure_logging=False)
    return False


def create_replica(
    config: EngineConfig, index: int, profile_text: str | None, authkey: bytes
) -> Any:
    """A replica actor given `config.num_threads` CPUs; Ray restarts it whenever its process
    dies (the front door notices and reconnects)."""
    ray = import_ray()
    actor_class = ray.remote(Replica)
    return actor_class.options(
        num_cpus=config.num_threads or 1, max_restarts=-1, max_task_retries=0
    ).remote(config, index, profile_text, authkey)


def same_process(actor: Any, pid: int | None) -> bool:
    """Whether `actor` still runs in process `pid` (False while Ray restarts it elsewhere)."""
    ray = import_ray()
    from conserve.cluster.transport import ray_errors

    try:
        return ray.get(actor.pid.remote(), timeout=2) == pid
    except ray_errors():
        return False


def kill(actor: Any, restart: bool) -> None:
    ray = import_ray()
    try:
        ray.kill(actor, no_restart=not restart)
    except Exception:  # noqa: BLE001 - an actor already gone is what we want
        log.debug("kill of a replica failed", exc_info=True)


def shutdown() -> None:
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()
