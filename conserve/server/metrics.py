"""Prometheus metrics, named like vLLM's with a `conserve:` prefix and a `class` label
(online/offline) where it applies. Request-level latencies are observed in the API process from
the stream of deltas; engine gauges and counters come from the engine core's stats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from conserve.core.messages import Stats

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)


class _EngineCollector:
    """Exposes the latest engine-core snapshot."""

    def __init__(self) -> None:
        self.stats: Stats | None = None

    def collect(self):
        s = self.stats
        if s is None:
            return
        running = GaugeMetricFamily(
            "conserve:num_requests_running", "Sequences running in the engine", labels=["class"]
        )
        waiting = GaugeMetricFamily(
            "conserve:num_requests_waiting", "Sequences waiting in the engine", labels=["class"]
        )
        for klass, (r, w) in s.by_class.items():
            running.add_metric([klass], r)
            waiting.add_metric([klass], w)
        yield running
        yield waiting
        yield GaugeMetricFamily(
            "conserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", value=s.kv_usage
        )
        yield CounterMetricFamily(
            "conserve:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            value=s.prefix_queries,
        )
        yield CounterMetricFamily(
            "conserve:prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            value=s.prefix_hits,
        )
        yield CounterMetricFamily(
            "conserve:shared_prefix_waits",
            "Times a waiting request was passed over while another computed its prompt's blocks",
            value=s.shared_prefix_waits,
        )
        preemptions = CounterMetricFamily(
            "conserve:num_preemptions", "Preemptions by kind", labels=["kind"]
        )
        for kind, n in s.preemptions_by_kind.items():
            preemptions.add_metric([kind], n)
        yield preemptions
        help_text = {
            "checkpointed_blocks": "KV blocks of offline requests copied to the host tier",
            "restored_blocks": "KV blocks copied back from the host tier on resume",
            "recomputed_tokens": "Tokens computed again after a preemption",
            "restored_tokens": "Tokens restored from the host tier instead of recomputed",
        }
        for key, n in s.kv_tiers.items():
            yield CounterMetricFamily(f"conserve:{key}", help_text.get(key, key), value=n)
        aborted = CounterMetricFamily(
            "conserve:num_aborted_requests",
            "Requests aborted before they finished (client gone, work cancelled)",
            labels=["class"],
        )
        for klass, n in s.aborted_by_class.items():
            aborted.add_metric([klass], n)
        yield aborted
        yield from _coserve_metrics(s)


def _coserve_metrics(s: Stats):
    """Online objectives met or missed, what offline work got beside online work, and the
    host tier's use (docs/dashboard.md)."""
    objectives = CounterMetricFamily(
        "conserve:online_objective",
        "Online sequences that met or missed their TTFT / TPOT objective",
        labels=["objective", "result"],
    )
    for objective, (met, missed) in s.online_objectives.items():
        objectives.add_metric([objective, "met"], met)
        objectives.add_metric([objective, "missed"], missed)
    yield objectives
    for name, help_text, value in (
        ("online_busy_seconds", "Seconds of steps that carried online work", s.online_busy_s),
        (
            "offline_only_busy_seconds",
            "Seconds of steps with offline work only",
            s.offline_only_busy_s,
        ),
        ("offline_only_tokens", "Tokens computed by offline-only steps", s.offline_only_tokens),
        ("offline_computed_tokens", "Offline tokens computed", s.offline_computed_tokens),
    ):
        yield CounterMetricFamily(f"conserve:{name}", help_text, value=value)
    yield GaugeMetricFamily(
        "conserve:host_kv_usage_perc",
        "Fraction of host-tier KV blocks in use (0-1; 0 without a host tier)",
        value=s.host_kv_usage,
    )


class _ReplicaCollector:
    """Per engine replica (`conserve serve --replicas N`), labelled `replica`: whether it is
    up, its restarts, what the router sent it, and its own engine figures. Empty with one
    engine process."""

    def __init__(self) -> None:
        self.snapshots: list[dict] = []

    def collect(self):
        snaps = self.snapshots
        if not snaps:
            return
        up = GaugeMetricFamily(
            "conserve:replica_up", "1 while the replica runs", labels=["replica"]
        )
        restarts = CounterMetricFamily(
            "conserve:replica_restarts",
            "Times the replica was lost and restarted",
            labels=["replica"],
        )
        routed = CounterMetricFamily(
            "conserve:replica_requests_routed",
            "Requests the router sent to the replica (retries included)",
            labels=["replica", "class"],
        )
        gauges = {
            name: GaugeMetricFamily(f"conserve:replica_{name}", text, labels=labels)
            for name, text, labels in (
                ("num_requests_running", "Sequences running", ["replica", "class"]),
                ("num_requests_waiting", "Sequences waiting", ["replica", "class"]),
                ("kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", ["replica"]),
            )
        }
        counters = {
            name: CounterMetricFamily(f"conserve:replica_{name}", text, labels=["replica"])
            for name, text in (
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache"),
            )
        }
        for snap in snaps:
            r = str(snap["replica"])
            up.add_metric([r], 1.0 if snap["up"] else 0.0)
            restarts.add_metric([r], snap["restarts"])
            for klass, n in snap["routed"].items():
                routed.add_metric([r, klass], n)
            s: Stats | None = snap["stats"]
            if s is None:
                continue
            for klass, (running, waiting) in s.by_class.items():
                gauges["num_requests_running"].add_metric([r, klass], running)
                gauges["num_requests_waiting"].add_metric([r, klass], waiting)
            gauges["kv_cache_usage_perc"].add_metric([r], s.kv_usage)
            counters["prefix_cache_queries"].add_metric([r], s.prefix_queries)
            counters["prefix_cache_hits"].add_metric([r], s.prefix_hits)
        yield from (up, restarts, routed, *gauges.values(), *counters.values())


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.engine = _EngineCollector()
        r.register(self.engine)
        self.replicas = _ReplicaCollector()
        r.register(self.replicas)
        self.prompt_tokens = Counter(
            "conserve:prompt_tokens", "Prompt tokens", ["class"], registry=r
        )
        self.generation_tokens = Counter(
            "conserve:generation_tokens", "Generated tokens", ["class"], registry=r
        )
        self.requests = Counter(
            "conserve:request_success",
            "Finished requests",
            ["class", "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "conserve:time_to_first_token_seconds",
            "Time to first token",
            ["class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "conserve:inter_token_latency_seconds",
            "Time between tokens",
            ["class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "conserve:e2e_request_latency_seconds",
            "End-to-end latency",
            ["class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.iteration = Histogram(
            "conserve:iteration_time_seconds",
            "Engine step time",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        self.preemption_latency = Histogram(
            "conserve:preemption_latency_seconds",
            "Layer-wise preemption: from the stop request to the stopped step",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preempted_layers = Histogram(
            "conserve:preemption_layers_run",
            "Layer-wise preemption: layers the stopped step had run",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.predicted = Counter(
            "conserve:iteration_predicted_seconds",
            "Sum of the latency model's forecasts, over forecast steps",
            registry=r,
        )
        self.measured = Counter(
            "conserve:iteration_measured_seconds",
            "Sum of measured step times, over the same steps",
            registry=r,
        )
        self.prediction_ratio = Histogram(
            "conserve:iteration_time_ratio",
            "Measured over predicted step time",
            buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 1.05, 1.1, 1.2, 1.5, 2.0, 4.0),
            registry=r,
        )

        self.engine_restarts = Counter(
            "conserve:engine_restarts",
            "Times the engine core died and a new one was started",
            registry=r,
        )

    def update_engine(self, stats: Stats) -> None:
        self.engine.stats = stats
        for t in stats.step_times:
            self.iteration.observe(t)
        for wait, layers in stats.layer_preemptions:
            self.preemption_latency.observe(wait)
            self.preempted_layers.observe(layers)
        for predicted, measured in stats.step_predictions:
            self.predicted.inc(predicted)
            self.measured.inc(measured)
            if predicted > 0:
                self.prediction_ratio.observe(measured / predicted)

    def update_replicas(self, snapshots: list[dict]) -> None:
        """Each replica's state (`ReplicaSet.replica_snapshots()`)."""
        self.replicas.snapshots = snapshots

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's TTFT, inter-token gaps and end-to-end time."""

    def __init__(self, metrics: Metrics, klass: str) -> None:
        self.m, self.klass = metrics, klass
        self.start = self.last = time.monotonic()
        self.first = True

    def on_delta(self, num_new_tokens: int) -> None:
        if num_new_tokens <= 0:
            return
        now = time.monotonic()
        if self.first:
            self.m.ttft.labels(self.klass).observe(now - self.start)
            self.first = False
        else:
            # a delta may carry several tokens: spread the gap evenly
            gap = (now - self.last) / num_new_tokens
            for _ in range(num_new_tokens):
                self.m.itl.labels(self.klass).observe(gap)
        self.last = now

    def on_finish(self, prompt_tokens: int, generated: int, reason: str | None) -> None:
        self.m.e2e.labels(self.klass).observe(time.monotonic() - self.start)
        self.m.prompt_tokens.labels(self.klass).inc(prompt_tokens)
        self.m.generation_tokens.labels(self.klass).inc(generated)
        self.m.requests.labels(self.klass, reason or "abort").inc()
