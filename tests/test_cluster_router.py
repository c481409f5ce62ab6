"""The scale-out pieces that need no Ray: the router's choices, merged replica stats, the
per-replica metrics, and the flags (a user who never asks for replicas never imports Ray)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conserve.cluster.merge import merge_stats
from conserve.cluster.router import ReplicaLoad, Router
from conserve.core.messages import Stats
from conserve.engine.latency import FEATURES, LatencyModel
from conserve.engine.request import RequestClass

ON, OFF = RequestClass.ONLINE, RequestClass.OFFLINE


def linear_model(const: float, per_token: float) -> LatencyModel:
    coef = np.zeros(len(FEATURES))
    coef[FEATURES.index("const")] = const
    coef[FEATURES.index("tokens")] = per_token
    return LatencyModel(coef)


def router(n: int = 2, **kw) -> Router:
    return Router([ReplicaLoad(model=linear_model(0.01, 0.001)) for _ in range(n)], 16, **kw)


def test_online_goes_where_the_predicted_ttft_is_lowest():
    r = router(3)
    r.loads[0].online_queued_tokens = 500  # a long prompt waits there
    r.loads[1].online_running = 0
    r.loads[2].online_queued_tokens = 100
    assert r.pick(ON, list(range(50))) == 1
    # a faster replica wins even with more waiting
    r.loads[1].online_queued_tokens = 200
    r.loads[2].model = linear_model(0.01, 0.0001)
    assert r.predicted_ttft(2, 50) < r.predicted_ttft(1, 50)
    assert r.pick(ON, list(range(50))) == 2
    assert r.loads[2].routed == {"online": 1, "offline": 0}


def test_offline_work_does_not_steer_online_requests():
    r = router()
    r.loads[0].offline_in_flight = 40
    r.loads[1].online_queued_tokens = 30
    assert r.pick(ON, list(range(20))) == 0


def test_online_ties_rotate_and_down_replicas_are_skipped():
    r = router(3)
    assert {r.pick(ON, [1, 2, 3]) for _ in range(6)} == {0, 1, 2}
    r.loads[1].up = False
    assert 1 not in {r.pick(ON, [1, 2, 3]) for _ in range(6)}
    for load in r.loads:
        load.up = False
    assert r.pick(ON, [1]) is None and r.pick(OFF, [1]) is None


def test_prefix_keys_name_whole_leading_blocks():
    r = router(max_blocks=3)
    a = list(range(100))
    assert len(r.prefix_keys(a[:15])) == 0  # no full block
    assert len(r.prefix_keys(a[:40])) == 2
    assert len(r.prefix_keys(a)) == 3  # capped
    b = [7] + a[1:]
    assert not set(r.prefix_keys(a)) & set(r.prefix_keys(b))  # a chain: the first block differs
    assert r.prefix_keys(a)[:2] == r.prefix_keys(a[:32])


def test_same_prefix_offline_requests_follow_their_home():
    r = router()
    shared = list(range(64))
    first = r.pick(OFF, shared + [1000])
    r.loads[first].offline_in_flight += 1
    for i in range(4):  # within the margin: they follow the shared prefix
        assert r.pick(OFF, shared + [2000 + i]) == first
        r.loads[first].offline_in_flight += 1
    other = 1 - first
    assert r.pick(OFF, [9] * 64) == other  # a new prefix starts where the load is lowest


def test_offline_spills_when_the_home_is_overloaded_and_the_prefix_moves():
    r = router(min_margin=4)
    shared = list(range(64))
    home = r.pick(OFF, shared)
    other = 1 - home
    r.loads[home].offline_in_flight = 10
    r.loads[other].offline_in_flight = 2
    assert r.pick(OFF, shared + [5]) == other  # 8 more than the least loaded > margin 4
    r.loads[home].offline_in_flight = r.loads[other].offline_in_flight = 3
    assert r.pick(OFF, shared + [6]) == other  # the prefix now lives there
    # the longest known prefix wins over a shorter one
    deep = shared + list(range(500, 564))
    r.loads[home].offline_in_flight = r.loads[other].offline_in_flight = 0
    r._homes[r.prefix_keys(deep)[-1]] = home
    assert r.pick(OFF, deep) == home


def test_offline_home_down_goes_to_the_least_loaded():
    r = router(3)
    shared = list(range(48))
    home = r.pick(OFF, shared)
    r.loads[home].up = False
    rest = [i for i in range(3) if i != home]
    r.loads[rest[0]].offline_in_flight = 5
    assert r.pick(OFF, shared) == rest[1]


def test_the_affinity_table_is_bounded():
    r = router(max_keys=10)
    for i in range(20):
        r.pick(OFF, [i] * 32)
    assert len(r._homes) == 10


def stats(**kw) -> Stats:
    base = dict(
        running=1, waiting=2, kv_usage=0.5, kv_tables=3,
        by_class={"online": (1, 0), "offline": (0, 2)}, num_preemptions=1,
        prefix_queries=100, prefix_hits=40, step_times=[0.01], integrity_error=None,
    )  # fmt: skip
    return Stats(**(base | kw))


def test_merged_stats_add_counts_and_weigh_kv_usage_by_blocks():
    a = stats(online_objectives={"ttft": (3, 1)}, preemptions_by_kind={"layer": 2})
    b = stats(kv_usage=0.0, step_times=[0.02, 0.03], online_objectives={"ttft": (1, 1)})
    m = merge_stats([(a, 300), (b, 100)])
    assert (m.running, m.waiting, m.kv_tables, m.prefix_hits) == (2, 4, 6, 80)
    assert m.by_class == {"online": (2, 0), "offline": (0, 4)}
    assert m.kv_usage == pytest.approx(0.375)
    assert m.step_times == [0.01, 0.02, 0.03]
    assert m.online_objectives == {"ttft": (4, 2)} and m.preemptions_by_kind == {"layer": 2}
    assert m.integrity_error is None
    bad = merge_stats([(a, 1), (stats(integrity_error="leaked block 7"), 1)])
    assert bad.integrity_error == "replica 1: leaked block 7"


def test_per_replica_metrics_render():
    from conserve.server.metrics import Metrics

    m = Metrics()
    assert b"replica" not in m.render()  # one engine process: no replica series
    m.update_replicas(
        [
            {"replica": 0, "up": True, "restarts": 1, "routed": {"online": 3, "offline": 5},
             "stats": stats()},
            {"replica": 1, "up": False, "restarts": 2, "routed": {"online": 0, "offline": 1},
             "stats": None},
        ]
    )  # fmt: skip
    text = m.render().decode()
    for line in (
        'conserve:replica_up{replica="0"} 1.0',
        'conserve:replica_up{replica="1"} 0.0',
        'conserve:replica_restarts_total{replica="1"} 2.0',
        'conserve:replica_requests_routed_total{class="offline",replica="0"} 5.0',
        'conserve:replica_prefix_cache_hits_total{replica="0"} 40.0',
        'conserve:replica_num_requests_waiting{class="offline",replica="0"} 2.0',
        'conserve:replica_kv_cache_usage_perc{replica="0"} 0.5',
    ):
        assert line in text, line
    assert 'conserve:replica_prefix_cache_hits_total{replica="1"}' not in text


_NO_RAY = """
import sys
sys.modules["ray"] = None  # any `import ray` now fails, as where it is not installed
from conserve.cli import main
import conserve.server.app, conserve.batch.execute, conserve.cluster.args
sys.exit(main(sys.argv[1:]))
"""


def test_without_ray_one_replica_needs_nothing_and_replicas_say_what_to_install():
    run = subprocess.run(
        [sys.executable, "-c", _NO_RAY, "serve", "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0 and "--replicas" in run.stdout and "--ray-address" in run.stdout
    run = subprocess.run(
        [sys.executable, "-c", _NO_RAY, "serve", "--replicas", "2", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "conserve-llm[ray]" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(
        [sys.executable, "-c", _NO_RAY, "serve", "--replicas", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--replicas must be at least 1" in run.stderr


def test_each_replica_owns_its_host_tier_directory_and_step_log(tmp_path):
    from conserve.cluster.replica import for_replica
    from conserve.config import CacheConfig, EngineConfig

    cfg = EngineConfig(
        cache=CacheConfig(host_kv_path=str(tmp_path / "tier")), step_log=str(tmp_path / "s.jsonl")
    )
    one, two = for_replica(cfg, 0), for_replica(cfg, 1)
    assert one.cache.host_kv_path == str(tmp_path / "tier" / "replica-0")
    assert two.cache.host_kv_path == str(tmp_path / "tier" / "replica-1")
    assert (one.step_log, two.step_log) == (
        str(tmp_path / "s.replica0.jsonl"),
        str(tmp_path / "s.replica1.jsonl"),
    )
    assert for_replica(EngineConfig(), 3) == EngineConfig()


def test_a_depth_first_batch_splits_into_subtrees_across_replicas():
    """Lines of a planned batch arrive subtree by subtree (each subtree: one shared document);
    with a window of lines in flight, each subtree stays on one replica and the subtrees
    spread over both."""
    r = router(min_margin=4)
    docs = [[1000 * d + i for i in range(128)] for d in range(6)]
    lines = [(d, docs[d] + [d, q]) for d in range(6) for q in range(8)]  # depth-first order
    window, in_flight, placed = 8, [], {}
    for d, prompt in lines:
        if len(in_flight) == window:  # the oldest line finishes, a seat frees
            r.loads[in_flight.pop(0)].offline_in_flight -= 1
        i = r.pick(OFF, prompt)
        r.loads[i].offline_in_flight += 1
        in_flight.append(i)
        placed.setdefault(d, []).append(i)
    assert {i for p in placed.values() for i in p} == {0, 1}  # the subtrees use both
    for d, p in placed.items():
        # a subtree's lines stay together: they move at most once (a spill when its replica
        # ran a margin ahead), and then follow the prefix's new home
        moves = sum(a != b for a, b in zip(p, p[1:], strict=False))
        assert moves <= 1, (d, p)
