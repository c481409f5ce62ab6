"""The scale-out flags (`--replicas`, `--ray-address`) and the engine client they ask for."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from conserve.config import EngineConfig
from conserve.engine_args import ConfigError

if TYPE_CHECKING:
    from conserve.core.client import EngineClient


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out (Ray; pip install 'conserve-llm[ray]')")
    group.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="engine replicas, each a Ray actor with its own engine and --threads CPUs "
        "(default per replica: the cores shared out); online requests go to the replica with "
        "the lowest predicted TTFT, offline ones by prompt-prefix affinity (default 1: one "
        "engine process, no Ray)",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to run the replicas on: 'auto' (the one `ray start` runs here), "
        "HOST:PORT, or 'local' (a Ray instance of this process, on the loopback address; "
        "the default with --replicas above 1). Giving it with --replicas 1 runs the one "
        "engine on Ray too",
    )


def uses_ray(args: argparse.Namespace) -> bool:
    return args.replicas > 1 or args.ray_address is not None


def check_cluster_args(args: argparse.Namespace) -> None:
    """Before anything starts: a clear error for a bad count or a missing Ray."""
    from conserve.cluster.launch import LOCAL, import_ray

    if args.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, not {args.replicas}")
    if uses_ray(args):
        import_ray(local=args.ray_address in (None, LOCAL))


def make_client(config: EngineConfig, args: argparse.Namespace) -> EngineClient:
    """One engine process (no Ray), or a ReplicaSet when the flags ask for Ray. Both answer
    the same calls; a ReplicaSet is typed as an EngineClient for its callers."""
    from conserve.core.client import EngineClient

    check_cluster_args(args)
    if not uses_ray(args):
        return EngineClient(config)
    from conserve.cluster.replicas import ReplicaSet, replica_config

    return ReplicaSet(replica_config(config, args.replicas), args.replicas, args.ray_address)  # type: ignore[return-value]
