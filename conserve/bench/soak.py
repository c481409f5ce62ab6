"""`conserve bench soak`: one server under mixed traffic for a while, its engine core killed
with SIGKILL every few minutes. Reports, per phase (the time between two kills), requests
answered and failed and P99 latencies; batch lines lost or duplicated; the engine's KV
integrity check and blocks in use once idle; the resident memory of the API process and of
the engine core over time, with the slope after warm-up. Exits 1 when a check fails."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conserve.bench.common import machine_info, write_results
from conserve.bench.soak_batches import BatchJobs
from conserve.bench.soak_traffic import Tally, Traffic
from conserve.tables import md_table

KINDS = ("online", "offline", "malformed")
OUTCOMES = ("ok", "left", "error", "unanswered")


def add_soak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--minutes", type=float, default=30, help="how long the traffic runs (default: 30)"
    )
    p.add_argument(
        "--kill-every-s",
        type=float,
        default=180,
        help="SIGKILL the engine core this often, in seconds (default: 180; 0: never)",
    )
    p.add_argument(
        "--online-users", type=int, default=2, help="concurrent streaming users (default: 2)"
    )
    p.add_argument(
        "--offline-clients", type=int, default=2, help="concurrent flex clients (default: 2)"
    )
    p.add_argument("--model", default="default", help="the served model (default: default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the traffic (default: 0)")
    p.add_argument(
        "--server-args",
        default="",
        help="more `conserve serve` options, one shell-quoted string",
    )
    p.add_argument("--output", default="benchmarks/results", help="where results are written")


@dataclass
class Samples:
    """Resident memory (MB) of the API process and of the engine core, over time."""

    t_s: list[float] = field(default_factory=list)
    api_mb: list[float] = field(default_factory=list)
    core_mb: list[float] = field(default_factory=list)
    kills: list[dict[str, float]] = field(default_factory=list)  # t_s, back_after_s
    health_gaps: list[str] = field(default_factory=list)


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _engine_pid(http, base: str, timeout_s: float, not_pid: int | None = None) -> int | None:
    """The engine core's pid once `/health` is 200 (with a pid other than `not_pid`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            r = await http.get(f"{base}/health", timeout=5)
            if r.status_code == 200 and r.json()["engine_pid"] != not_pid:
                return r.json()["engine_pid"]
        await asyncio.sleep(0.2)
    return None


async def _killer(http, base: str, every_s: float, tally: Tally, s: Samples, t0: float, stop):
    while every_s > 0 and not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
            return
        pid = await _engine_pid(http, base, 30)
        if pid is None:
            s.health_gaps.append(f"{time.monotonic() - t0:.0f} s: no healthy engine to kill")
            continue
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        tally.phase += 1
        back = await _engine_pid(http, base, 300, not_pid=pid)
        s.kills.append({"t_s": killed - t0, "back_after_s": time.monotonic() - killed})
        if back is None:
            s.health_gaps.append(f"{killed - t0:.0f} s: not healthy 300 s after the kill")


async def _sampler(http, base: str, api_pid: int, s: Samples, t0: float, stop) -> None:
    while not stop.is_set():
        core = await _engine_pid(http, base, 1)
        s.t_s.append(time.monotonic() - t0)
        s.api_mb.append(_rss_mb(api_pid))
        s.core_mb.append(_rss_mb(core) if core else float("nan"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 5)


async def _drive(args: argparse.Namespace, base: str, api_pid: int) -> dict[str, Any]:
    import httpx

    rng = random.Random(args.seed)
    tally, samples = Tally(), Samples()
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as http:
        model = (await http.get(f"{base}/v1/models")).json()["data"][0]["id"]
        traffic = Traffic(base, model, tally, rng)
        jobs = BatchJobs(base, model, random.Random(args.seed + 1))
        t0 = time.monotonic()
        stop_bg = asyncio.Event()
        tasks = [asyncio.create_task(traffic.online_user(http)) for _ in range(args.online_users)]
        tasks += [
            asyncio.create_task(traffic.offline_client(http)) for _ in range(args.offline_clients)
        ]
        tasks.append(asyncio.create_task(traffic.malformed(http)))
        batches = asyncio.create_task(jobs.run(http))
        bg = [
            asyncio.create_task(
                _killer(http, base, args.kill_every_s, tally, samples, t0, stop_bg)
            ),
            asyncio.create_task(_sampler(http, base, api_pid, samples, t0, stop_bg)),
        ]
        await _progress(args.minutes * 60, tally, jobs, samples)
        traffic.stop.set()
        jobs.stop.set()
        stop_bg.set()
        await asyncio.gather(*tasks, *bg)
        await batches  # the batch running at the end is awaited to its end
        await _engine_pid(http, base, 300)
        final = await _final_request(http, base, model)
        kv = (await http.get(f"{base}/debug/kv")).json()
    return {"tally": tally, "jobs": jobs.tally, "samples": samples, "kv": kv, "final": final}


async def _final_request(http, base: str, model: str) -> bool:
    """Once the traffic stopped: does a plain request get its answer (after the last kill)?"""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with contextlib.suppress(Exception):
        r = await http.post(f"{base}/v1/chat/completions", json=body)
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    return False


async def _progress(duration_s: float, tally: Tally, jobs: BatchJobs, s: Samples) -> None:
    """Wait `duration_s`, printing a status line to stderr every 30 s."""
    t0 = time.monotonic()
    while (left := duration_s - (time.monotonic() - t0)) > 0:
        await asyncio.sleep(min(30, left))
        done = sum(n for (_, _, o), n in tally.outcomes.items() if o == "ok")
        print(
            f"[soak] {time.monotonic() - t0:5.0f}/{duration_s:.0f} s: {done} requests ok, "
            f"{jobs.tally.submitted} batches, {len(s.kills)} engine kills",
            file=sys.stderr,
            flush=True,
        )


def _slope_mb_per_min(t_s: list[float], mb: list[float], warmup_s: float) -> float | None:
    t, m = np.asarray(t_s), np.asarray(mb)
    keep = (t >= warmup_s) & np.isfinite(m)
    if keep.sum() < 3:
        return None
    return float(np.polyfit(t[keep] / 60, m[keep], 1)[0])


def summarize(run: dict[str, Any], duration_s: float) -> dict[str, Any]:
    tally: Tally = run["tally"]
    s: Samples = run["samples"]
    phases = []
    for p in range(tally.phase + 1):
        row: dict[str, Any] = {"phase": p}
        for kind in KINDS:
            row[kind] = {o: tally.outcomes.get((p, kind, o), 0) for o in OUTCOMES}
        ttft = tally.ttft_s.get(p, [])
        row["online_ttft_p99_s"] = float(np.percentile(ttft, 99)) if ttft else None
        for kind in ("online", "offline"):
            e2e = tally.e2e_s.get((p, kind), [])
            row[f"{kind}_e2e_p99_s"] = float(np.percentile(e2e, 99)) if e2e else None
        phases.append(row)
    warmup = min(120.0, duration_s / 5)
    kv = run["kv"]
    jobs = run["jobs"]
    unanswered = sum(n for (_, _, o), n in tally.outcomes.items() if o == "unanswered")
    checks = {
        "batch lines lost": jobs.lost == 0,
        "batch lines duplicated": jobs.duplicated == 0,
        "batches ended": not jobs.unfinished and not jobs.problems,
        "KV integrity": kv.get("integrity_error") is None,
        "no request left in the engine": kv.get("running") == 0 and kv.get("waiting") == 0,
        "every failure an OpenAI error object": unanswered == 0,
        "engine healthy after every kill": not s.health_gaps,
        "a request answered once the traffic stopped": run["final"],
    }
    return {
        "phases": phases,
        "batches": asdict(jobs),
        "kv": kv,
        "memory": {
            "warmup_s": warmup,
            "api_slope_mb_per_min": _slope_mb_per_min(s.t_s, s.api_mb, warmup),
            "api_mb_first_last": [s.api_mb[0], s.api_mb[-1]] if s.api_mb else None,
            "core_mb_max": float(np.nanmax(s.core_mb)) if s.core_mb else None,
            "samples": {"t_s": s.t_s, "api_mb": s.api_mb, "core_mb": s.core_mb},
        },
        "kills": s.kills,
        "health_gaps": s.health_gaps,
        "unanswered_examples": tally.examples,
        "errors": [
            {"phase": p, "kind": k, "error": e, "n": n}
            for (p, k, e), n in sorted(tally.errors.items())
        ],
        "checks": checks,
        "passed": all(checks.values()),
    }


def _fmt(x: float | None, scale: float = 1000, digits: int = 0) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def render_markdown(info: dict[str, Any], res: dict[str, Any]) -> str:
    rows = []
    for p in res["phases"]:
        cells = [str(p["phase"])]
        for kind in KINDS:
            c = p[kind]
            cells.append(f"{c['ok']} / {c['left']} / {c['error']} / {c['unanswered']}")
        cells += [_fmt(p["online_ttft_p99_s"]), _fmt(p["online_e2e_p99_s"])]
        cells.append(_fmt(p["offline_e2e_p99_s"]))
        rows.append(cells)
    head = ["phase", "online ok/left/error/unanswered", "offline", "malformed"]
    head += ["online TTFT P99 ms", "online E2E P99 ms", "offline E2E P99 ms"]
    b, m = res["batches"], res["memory"]
    kills = ", ".join(f"{k['t_s']:.0f} s (back in {k['back_after_s']:.1f} s)" for k in res["kills"])
    lines = [
        "# conserve bench soak",
        "",
        f"{info['date']} · {info['cpu']} · {info['cores']} cores · `{info['command']}`",
        "",
        "A phase ends at each SIGKILL of the engine core. Engine kills at: " + (kills or "none"),
        "",
        md_table(head, rows),
        "",
        f"Batches: {b['submitted']} submitted, {b['cancelled']} cancel requests, ended "
        f"{b['ended']}; {b['lines']} lines checked: {b['lost']} lost, {b['duplicated']} "
        f"duplicated; still running at the end: {len(b['unfinished'])}.",
        "",
        f"KV after the run: integrity {res['kv'].get('integrity_error') or 'ok'}, usage "
        f"{res['kv'].get('kv_usage')}, running {res['kv'].get('running')}, waiting "
        f"{res['kv'].get('waiting')}.",
        "",
        f"Resident memory: API process {m['api_mb_first_last']} MB (first, last sample), slope "
        f"after {m['warmup_s']:.0f} s warm-up {_fmt(m['api_slope_mb_per_min'], 1, 2)} MB/min; "
        f"engine core max {_fmt(m['core_mb_max'], 1)} MB (a new core after each kill).",
        "",
        "| check | result |",
        "|---|---|",
        *(f"| {k} | {'PASS' if v else 'FAIL'} |" for k, v in res["checks"].items()),
    ]
    if res["errors"]:
        lines += ["", "Failures answered with an OpenAI error object (phase, kind, error):", ""]
        lines += [f"- {e['phase']} {e['kind']}: {e['error']} (x{e['n']})" for e in res["errors"]]
    if res["unanswered_examples"] or res["health_gaps"] or b["problems"]:
        lines += ["", "Problems:", ""]
        lines += [f"- {x}" for x in [*res["unanswered_examples"], *res["health_gaps"]]]
        lines += [f"- {x}" for x in b["problems"]]
    return "\n".join(lines) + "\n"


def run_soak(args: argparse.Namespace) -> int:
    from conserve.bench.serve import launch_conserve

    data = tempfile.mkdtemp(prefix="conserve-soak-")
    extra = ["--data-dir", data, *shlex.split(args.server_args)]
    server = launch_conserve(args.model, "auto", extra)
    try:
        server.wait_healthy(900)
        run = asyncio.run(_drive(args, server.base_url, server.proc.pid))
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
    res = summarize(run, args.minutes * 60)
    info = machine_info()
    md = render_markdown(info, res)
    path = write_results(args.output, "soak", md, {"machine": info, "result": res})
    print(md)
    print(f"[soak] results: {path}", file=sys.stderr)
    return 0 if res["passed"] else 1
