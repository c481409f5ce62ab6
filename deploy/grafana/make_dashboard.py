"""Writes conserve.json beside this file: the Grafana dashboard of a conserve server's
`/metrics` (see conserve/server/metrics.py for what each metric means).

    python deploy/grafana/make_dashboard.py

Standard library only. The output is deterministic, and tests/test_grafana.py checks that the
committed conserve.json is what this script writes and that every metric its queries name is
one a running server exports: edit this file, run it, commit both."""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("conserve.json")

# A datasource variable: the board works on import and under provisioning, and the Prometheus
# it reads can be switched from the dropdown.
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE = "$__rate_interval"
WIDTH = 24  # Grafana's grid is 24 columns wide
HEIGHT = 8


# --- PromQL -------------------------------------------------------------------------------


def sel(metric: str, **labels: str) -> str:
    """`metric{label="value",...,instance=~"$instance"}`; `klass` stands for the `class` label
    (a Python keyword)."""
    matchers = [f'{"class" if k == "klass" else k}="{v}"' for k, v in labels.items()]
    matchers.append('instance=~"$instance"')
    return f"{metric}{{{','.join(matchers)}}}"


def rate(metric: str, by: str = "", **labels: str) -> str:
    """Per-second rate of a counter, summed over instances (and grouped by `by`)."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({sel(metric, **labels)}[{RATE}]))"


def quantile(q: float, histogram: str, **labels: str) -> str:
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', 'le', **labels)})"


# --- targets and panels -------------------------------------------------------------------


def target(expr: str, legend: str, **extra) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, **extra}


def quantiles(
    histogram: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99), legend: str = "", **labels: str
) -> list[dict]:
    return [target(quantile(q, histogram, **labels), f"{legend}P{round(q * 100)}") for q in qs]


def timeseries(title: str, targets: list[dict], unit: str, description: str, **defaults) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {"drawStyle": "line", "fillOpacity": 10, "showPoints": "never"},
                **defaults,
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def stat(title: str, targets: list[dict], unit: str, description: str) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 1}, "overrides": []},
        "options": {
            "colorMode": "value",
            "graphMode": "area",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
        "targets": targets,
    }


def heatmap(title: str, histogram: str, description: str) -> dict:
    """Observations per bucket over time, the buckets as Prometheus keeps them."""
    expr = f"sum by (le) (increase({sel(histogram + '_bucket')}[{RATE}]))"
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "options": {
            "calculate": False,
            "yAxis": {"axisPlacement": "left"},
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "cellGap": 1,
            "tooltip": {"show": True, "yHistogram": True},
        },
        "targets": [target(expr, "{{le}}", format="heatmap")],
    }


# --- the board ----------------------------------------------------------------------------


def class_row(klass: str) -> list[dict]:
    """TTFT, inter-token and end-to-end latency of one request class."""
    what = {
        "online": "interactive requests (the default service tier)",
        "offline": 'requests with `service_tier: "flex"` or a positive priority',
    }[klass]
    return [
        timeseries(
            f"{klass.capitalize()} TTFT",
            quantiles("conserve:time_to_first_token_seconds", klass=klass),
            "s",
            f"Time to first token of {what}, measured in the API process.",
        ),
        timeseries(
            f"{klass.capitalize()} inter-token latency",
            quantiles("conserve:inter_token_latency_seconds", klass=klass),
            "s",
            f"Time between tokens of {what}; a delta of several tokens counts its gap evenly.",
        ),
        timeseries(
            f"{klass.capitalize()} end-to-end latency",
            quantiles("conserve:e2e_request_latency_seconds", klass=klass),
            "s",
            f"From arrival to the last token, of {what}.",
        ),
    ]


def throughput_row() -> list[dict]:
    return [
        timeseries(
            "Requests finished / s",
            [
                target(
                    rate("conserve:request_success_total", "class, finished_reason"),
                    "{{class}} {{finished_reason}}",
                )
            ],
            "reqps",
            "By class and finish reason (stop, length, abort).",
        ),
        timeseries(
            "Prompt tokens / s",
            [target(rate("conserve:prompt_tokens_total", "class"), "{{class}}")],
            "short",
            "Prompt tokens of finished requests, by class.",
        ),
        timeseries(
            "Generation tokens / s",
            [target(rate("conserve:generation_tokens_total", "class"), "{{class}}")],
            "short",
            "Generated tokens of finished requests, by class. The offline line is the "
            "throughput harvested beside the online load.",
        ),
        stat(
            "Offline tokens / s (harvested)",
            [target(rate("conserve:generation_tokens_total", klass="offline"), "offline")],
            "short",
            "Offline generation tokens per second: what co-serving gets out of the capacity "
            "the online requests leave.",
        ),
        timeseries(
            "Online objectives met",
            [
                target(
                    f"{rate('conserve:online_objective_total', 'objective', result='met')}"
                    f" / {rate('conserve:online_objective_total', 'objective')}",
                    "{{objective}}",
                )
            ],
            "percentunit",
            "Share of online sequences that met their TTFT / TPOT objective (as if alone "
            "plus the slack, or the absolute --ttft-slo / --tpot-slo).",
            max=1,
        ),
        timeseries(
            "Offline tokens computed / s and the harvest ceiling",
            [
                target(rate("conserve:offline_computed_tokens_total"), "offline tokens / s"),
                target(
                    f"{rate('conserve:offline_only_tokens_total')}"
                    f" / {rate('conserve:offline_only_busy_seconds_total')}"
                    f" * (1 - {rate('conserve:online_busy_seconds_total')})",
                    "ceiling",
                ),
            ],
            "short",
            "Offline tokens (prompt and output) the engine computed per second, beside a "
            "ceiling: the rate of offline-only steps times the share of time online work left "
            "(docs/dashboard.md).",
        ),
    ]


def engine_row() -> list[dict]:
    return [
        timeseries(
            "Requests running",
            [target(f"sum by (class) ({sel('conserve:num_requests_running')})", "{{class}}")],
            "short",
            "Sequences in the engine's running set, by class.",
        ),
        timeseries(
            "Requests waiting",
            [target(f"sum by (class) ({sel('conserve:num_requests_waiting')})", "{{class}}")],
            "short",
            "Sequences waiting for admission, by class.",
        ),
        timeseries(
            "KV cache usage",
            [target(sel("conserve:kv_cache_usage_perc"), "{{instance}}")],
            "percentunit",
            "Fraction of the device KV blocks in use.",
            max=1,
        ),
        timeseries(
            "Prefix cache hit rate",
            [
                target(
                    f"{rate('conserve:prefix_cache_hits_total')}"
                    f" / {rate('conserve:prefix_cache_queries_total')}",
                    "hit rate",
                )
            ],
            "percentunit",
            "Prompt tokens found in the prefix cache over prompt tokens looked up.",
            max=1,
        ),
        timeseries(
            "Shared-prefix waits / s",
            [target(rate("conserve:shared_prefix_waits_total"), "waits")],
            "short",
            "Times a waiting request was passed over while another request computed the "
            "blocks of the prompt prefix they share.",
        ),
        timeseries(
            "Aborted requests / s",
            [target(rate("conserve:num_aborted_requests_total", "class"), "{{class}}")],
            "short",
            "Requests the engine aborted, by class: clients that left, cancelled batches.",
        ),
        timeseries(
            "Engine restarts",
            [target(f"increase({sel('conserve:engine_restarts_total')}[1h])", "last hour")],
            "short",
            "Times the engine core died and the server started a new one.",
        ),
    ]


def preemption_row() -> list[dict]:
    return [
        timeseries(
            "Preemptions / s",
            [target(rate("conserve:num_preemptions_total", "kind"), "{{kind}}")],
            "short",
            "`recompute_<class>`: a sequence gave up its blocks or its seat; `layer`: a step "
            "was stopped between layers for arriving online work.",
        ),
        timeseries(
            "Layer-wise preemption latency",
            quantiles("conserve:preemption_latency_seconds", (0.5, 0.99)),
            "s",
            "From the stop request to the stopped step.",
        ),
        timeseries(
            "Layers run before a stop",
            quantiles("conserve:preemption_layers_run", (0.5, 0.99)),
            "short",
            "Layers the stopped step had run when it stopped.",
        ),
    ]


def steps_row() -> list[dict]:
    return [
        timeseries(
            "Step time",
            quantiles("conserve:iteration_time_seconds", (0.5, 0.99)),
            "s",
            "Engine step time.",
        ),
        timeseries(
            "Engine busy",
            [target(rate("conserve:iteration_time_seconds_sum", "instance"), "{{instance}}")],
            "percentunit",
            "Fraction of wall time each server's engine spent in steps.",
        ),
        timeseries(
            "Latency model: measured / predicted",
            [
                target(
                    f"{rate('conserve:iteration_measured_seconds_total')}"
                    f" / {rate('conserve:iteration_predicted_seconds_total')}",
                    "sum measured / sum predicted",
                ),
                *quantiles("conserve:iteration_time_ratio", (0.5,), "per step "),
            ],
            "none",
            "Forecast error of the latency model over the steps it forecast: above 1, steps "
            "run slower than the profile predicts.",
        ),
        heatmap(
            "Latency model: ratio per step",
            "conserve:iteration_time_ratio",
            "Measured over predicted step time, per forecast step.",
        ),
    ]


def host_tier_row() -> list[dict]:
    return [
        timeseries(
            "Host tier: blocks / s",
            [
                target(rate("conserve:checkpointed_blocks_total"), "checkpointed"),
                target(rate("conserve:restored_blocks_total"), "restored"),
            ],
            "short",
            "KV blocks of offline requests copied to the host tier, and copied back on resume.",
        ),
        timeseries(
            "Preempted work: tokens / s",
            [
                target(rate("conserve:recomputed_tokens_total"), "recomputed"),
                target(rate("conserve:restored_tokens_total"), "restored"),
            ],
            "short",
            "Tokens computed again after a preemption, and tokens restored from the host tier "
            "instead.",
        ),
    ]


def rows() -> list[tuple[str, list[dict]]]:
    return [
        ("Online requests", class_row("online")),
        ("Offline requests", class_row("offline")),
        ("Throughput", throughput_row()),
        ("Engine", engine_row()),
        ("Preemption", preemption_row()),
        ("Steps and latency model", steps_row()),
        ("Host KV tier", host_tier_row()),
    ]


def lines(row: list[dict]) -> list[list[dict]]:
    """A row's panels in lines of at most four, as even as they go (5 -> 3 + 2)."""
    n_lines = -(-len(row) // 4)
    per_line = -(-len(row) // n_lines)
    return [row[i : i + per_line] for i in range(0, len(row), per_line)]


def row_panel(title: str, y: int) -> dict:
    grid = {"h": 1, "w": WIDTH, "x": 0, "y": y}
    return {"type": "row", "title": title, "collapsed": False, "gridPos": grid, "panels": []}


def layout(rows: list[tuple[str, list[dict]]]) -> list[dict]:
    """Rows top to bottom, each row's panels left to right sharing the width of their line,
    with ids and grid positions."""
    panels: list[dict] = []
    y = 0
    for title, row in rows:
        panels.append(row_panel(title, y))
        y += 1
        for line in lines(row):
            w = WIDTH // len(line)
            for i, panel in enumerate(line):
                panel["gridPos"] = {"h": HEIGHT, "w": w, "x": i * w, "y": y}
                panels.append(panel)
            y += HEIGHT
    for i, panel in enumerate(panels, 1):
        panel["id"] = i
    return panels


def templating() -> dict:
    instances = "label_values(conserve:kv_cache_usage_perc, instance)"
    return {
        "list": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
            },
            {
                "name": "instance",
                "label": "Server",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": instances,
                "query": {"query": instances, "refId": "instances"},
                "current": {},
                "includeAll": True,
                "allValue": ".*",
                "multi": True,
                "refresh": 2,
                "sort": 1,
                "hide": 0,
            },
        ]
    }


def dashboard() -> dict:
    return {
        "id": None,
        "uid": "conserve",
        "title": "conserve",
        "description": "Online and offline requests co-served on one engine: latency by class, "
        "throughput, engine state, preemption, latency model and host KV tier.",
        "tags": ["conserve", "llm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": templating(),
        "panels": layout(rows()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
