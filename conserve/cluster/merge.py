"""One `Stats` for several replicas: counts and times added, KV usage averaged over the
replicas' blocks, per-step lists joined. Cumulative counters restart from zero with a replica
(Prometheus reads that as a counter reset)."""

from __future__ import annotations

from collections.abc import Iterable

from conserve.core.messages import Stats


def _add_dicts(dicts: Iterable[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, tuple):
                old = out.get(k, (0,) * len(v))
                out[k] = tuple(a + b for a, b in zip(old, v, strict=True))
            else:
                out[k] = out.get(k, 0) + v
    return out


def merge_stats(parts: list[tuple[Stats, int]]) -> Stats:
    """`parts`: each replica's stats with its number of KV blocks (the weight of its usage)."""
    assert parts, "no replica answered"
    stats = [s for s, _ in parts]
    blocks = sum(n for _, n in parts) or 1
    errors = [f"replica {i}: {s.integrity_error}" for i, s in enumerate(stats) if s.integrity_error]

    def total(name: str):
        return sum(getattr(s, name) for s in stats)

    def joined(name: str) -> list:
        return [x for s in stats for x in getattr(s, name)]

    return Stats(
        running=total("running"),
        waiting=total("waiting"),
        kv_usage=sum(s.kv_usage * n for s, n in parts) / blocks,
        kv_tables=total("kv_tables"),
        by_class=_add_dicts(s.by_class for s in stats),
        num_preemptions=total("num_preemptions"),
        prefix_queries=total("prefix_queries"),
        prefix_hits=total("prefix_hits"),
        step_times=joined("step_times"),
        integrity_error="; ".join(errors) or None,
        preemptions_by_kind=_add_dicts(s.preemptions_by_kind for s in stats),
        layer_preemptions=joined("layer_preemptions"),
        step_predictions=joined("step_predictions"),
        kv_tiers=_add_dicts(s.kv_tiers for s in stats),
        shared_prefix_waits=total("shared_prefix_waits"),
        aborted_by_class=_add_dicts(s.aborted_by_class for s in stats),
        online_objectives=_add_dicts(s.online_objectives for s in stats),
        online_busy_s=total("online_busy_s"),
        offline_only_busy_s=total("offline_only_busy_s"),
        offline_only_tokens=total("offline_only_tokens"),
        offline_computed_tokens=total("offline_computed_tokens"),
        host_kv_usage=sum(s.host_kv_usage for s in stats) / len(stats),
        engines=sum(s.engines for s in stats),
    )
