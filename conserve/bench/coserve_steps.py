"""What a `conserve bench coserve` run learns from the server besides its answers: counters from
/metrics (busy time, preemptions) and a summary of the engine's step log (`--step-log`): where
the engine's time went, how long online requests waited inside it, how well it predicted its
steps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np


def scrape(base_url: str) -> dict[str, float]:
    """Counters of interest from /metrics (conserve only)."""
    import httpx

    out: dict[str, float] = {}
    try:
        text = httpx.get(base_url + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        m = re.match(r'conserve:num_preemptions_total\{kind="([^"]+)"\} ([0-9.e+]+)', line)
        if m:
            out[f"preemptions_{m.group(1)}"] = float(m.group(2))
        m = re.match(r"conserve:iteration_time_seconds_sum ([0-9.e+]+)", line)
        if m:
            out["busy_s"] = float(m.group(1))
    return out


def step_log_summary(path: Path, t0: float, window: float) -> dict[str, Any]:
    """Where the engine's time went during the run's window, from its `--step-log`: time
    spent in steps by kind, compute thrown away by stopped steps, and for online requests
    the time from reaching the engine to the end of the step that computed their prompt
    (the engine's part of TTFT) and what ran meanwhile."""
    import json

    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if t0 <= r["t"] <= t0 + window]
    steps = [r for r in recs if "run_s" in r]
    # from when the request reached the engine's process (older logs: when the loop took it)
    added = {r["added"]: r.get("arrived", r["t"]) for r in recs if r.get("class") == "online"}
    engine_ttft, blocked = _online_waits(steps, added)

    def pct(v: list[float], q: float) -> float | None:
        return float(np.percentile(np.asarray(v) * 1e3, q)) if v else None

    stopped = [r for r in steps if r["stopped_at_layer"] is not None]
    waits = [r["stop_wait_s"] for r in stopped if r.get("stop_wait_s") is not None]
    finished = [r for r in steps if r["stopped_at_layer"] is None]
    err = [
        abs(r["predicted_s"] - r["run_s"]) / r["run_s"]
        for r in finished
        if r["predicted_s"] and r["run_s"] > 0
    ]
    return {
        "steps": len(steps),
        "engine_ttft_ms": {
            "median": pct(engine_ttft, 50),
            "p99": pct(engine_ttft, 99),
            "max": pct(engine_ttft, 100),
        },
        "offline_blocking_ms": {
            "median": pct(blocked, 50),
            "p99": pct(blocked, 99),
            "max": pct(blocked, 100),
        },
        "busy_s": _busy_by_kind(finished),
        "stopped_steps": len(stopped),
        # from a stop request to the safepoint that honoured it
        "stop_wait_ms": {"median": pct(waits, 50), "max": pct(waits, 100)},
        # a stopped step kept for its resume loses nothing (unless dropped later)
        "stopped_compute_s": round(sum(r["run_s"] for r in stopped if not r.get("kept")), 2),
        "resumed_steps": sum(1 for r in steps if r.get("resumed_from_layer") is not None),
        "plan_apply_s": round(sum(r["plan_s"] + r["apply_s"] for r in steps), 2),
        "prediction_error_median": float(np.median(err)) if err else None,
    }


def _online_waits(
    steps: list[dict[str, Any]], added: dict[str, float]
) -> tuple[list[float], list[float]]:
    """Per online request, in seconds (the first list sorted): from reaching the engine
    to the end of the step that computed its prompt, and the part of that during which steps
    carrying offline work ran."""
    done: dict[str, float] = {}
    for r in steps:
        if r["stopped_at_layer"] is None:
            for rid in r["online_prefill_ids"]:
                done[rid] = r["t"] + r["run_s"] + r["apply_s"]
    engine_ttft = sorted(done[k] - added[k] for k in done if k in added)
    blocked = []
    for rid, t_add in added.items():
        if rid not in done:
            continue
        b = sum(
            min(r["t"] + r["run_s"], done[rid]) - max(r["t"], t_add)
            for r in steps
            if r["offline"][0] and r["t"] < done[rid] and r["t"] + r["run_s"] > t_add
        )
        blocked.append(max(0.0, b))
    return engine_ttft, blocked


def _busy_by_kind(finished: list[dict[str, Any]]) -> dict[str, float]:
    """Compute seconds of the steps that ran to their end, by what they carried."""
    kinds = {"online only": 0.0, "mixed": 0.0, "offline only": 0.0}
    for r in finished:
        if not r["online"][0]:
            kinds["offline only"] += r["run_s"]
        elif r["offline"][0]:
            kinds["mixed"] += r["run_s"]
        else:
            kinds["online only"] += r["run_s"]
    return {k: round(v, 2) for k, v in kinds.items()}
