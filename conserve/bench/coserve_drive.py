"""Driving one `conserve bench coserve` run against a server: the offline job submitted at time
0 (as requests with `priority: 1`, or as one Batch API file), the online load beside it (a
trace replayed at its times, or closed-loop users), or a fixed window when there is no online
load; at the end of the window the offline work still running is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conserve.bench.coserve_steps import scrape, step_log_summary
from conserve.bench.coserve_workloads import OnlineLoad, TraceLoad, UserPlan, UsersLoad
from conserve.bench.serve import (
    BenchRequest,
    LaunchedServer,
    RequestRecord,
    request_body,
    send_one,
    served_model,
)
from conserve.platform import cpu_steal_s

NOT_SENT = "not sent: the users' time limit had passed"
# With offline work, the measured window starts this long after it (the online load starts
# then, if there is one; the offline-alone runs wait the same): the window is one in which the
# offline job is already running, and offline tokens are counted from then on in every run. (An
# offline-alone run counted from time 0 credited itself with the start-up burst of 256 prompts
# that no mixed run counted: a decode-heavy job's ceiling came out about 8% too high.)
ONLINE_LEAD_S = 5.0


@dataclass
class RunResult:
    """What one run measured. `online` holds one record per online request of the load, by
    index (requests a closed-loop user never sent carry the error NOT_SENT)."""

    online: list[RequestRecord]
    offline: list[RequestRecord]
    window_s: float
    engine: dict[str, float] = field(default_factory=dict)  # /metrics deltas (conserve only)
    steps: dict[str, Any] | None = None  # what the engine's step log says (conserve only)
    batch: dict[str, Any] | None = None  # the offline job's result when it ran as a batch
    server: dict[str, Any] | None = None  # the server's /version (policy, SLOs)
    lead_s: float = 0.0  # the measured window started this long after the offline job
    steal_s: float | None = None  # CPU time the hypervisor took during the window (Linux)


@dataclass
class Window:
    """The records of one driven window, its length, and its start on the `time.monotonic()`
    clock (the clock of the engine's step log)."""

    online: list[RequestRecord]
    offline: list[RequestRecord]
    window_s: float
    t0_monotonic: float
    batch: dict[str, Any] | None = None
    lead_s: float = 0.0


def token_times(rec: RequestRecord) -> list[float]:
    """Arrival times (s after the run start) of the record's tokens: each text chunk's time,
    once per token it carried (when the server said so, else once)."""
    if rec.ttft_s is None:
        return []
    t = rec.sent_s + rec.ttft_s
    out = [t]
    for gap in rec.itl_s:
        t += gap
        out.append(t)
    if len(rec.chunk_tokens) == len(out):
        out = [x for x, n in zip(out, rec.chunk_tokens, strict=True) for _ in range(n)]
    return out


def _records(reqs: list[BenchRequest]) -> list[RequestRecord]:
    return [RequestRecord(r.index, r.prompt_len, r.output_len, r.arrival_s) for r in reqs]


async def _replay(c, url, headers, model, load: TraceLoad, recs, t0: float) -> None:
    """Send each request at its arrival time (seconds after `t0`, a `time.perf_counter()`
    value) and wait for all answers."""
    tasks = []
    for r, rec in zip(load.requests, recs, strict=True):
        delay = t0 + r.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = request_body(r, model, "completions")
        tasks.append(asyncio.create_task(send_one(c, url, headers, body, rec, t0)))
    await asyncio.gather(*tasks)


async def _users(c, url, headers, model, load: UsersLoad, recs, t0: float) -> None:
    """Every user sends its requests one at a time, each after its think time (counted as
    `load.think_from` says), until its requests are done or the load's time limit has
    passed."""
    by_index = {rec.index: rec for rec in recs}

    async def one_user(plan: UserPlan) -> None:
        due = 0.0  # paced users: when the next request is due, seconds after t0
        for r, think in zip(plan.requests, plan.think_s, strict=True):
            if load.think_from == "send":
                due += think
                await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
            else:
                await asyncio.sleep(think)
            rec = by_index[r.index]
            if load.max_s is not None and time.perf_counter() - t0 >= load.max_s:
                rec.error = NOT_SENT
                continue
            rec.scheduled_s = time.perf_counter() - t0  # one in flight: sent when planned
            await send_one(c, url, headers, request_body(r, model, "completions"), rec, t0)

    await asyncio.gather(*(one_user(p) for p in load.users))


async def _online_part(c, url, headers, model, online: OnlineLoad | None, recs, t0, window_s):
    if online is None:
        await asyncio.sleep(window_s or 0.0)
    elif isinstance(online, TraceLoad):
        await _replay(c, url, headers, model, online, recs, t0)
    else:
        await _users(c, url, headers, model, online, recs, t0)


async def run_mixed(
    base_url: str,
    model: str,
    online: OnlineLoad | None,
    offline: list[BenchRequest],
    api_key: str | None = None,
    window_s: float | None = None,
    as_batch: bool = False,
    offline_clients: int | None = None,
) -> Window:
    """Offline work from time 0 and, ONLINE_LEAD_S later, the online load beside it; the
    window ends when the online load is done (or `window_s` after the lead when there is
    none). Offline requests are sent by
    `offline_clients` clients, each sending the next request of the job when its last one is
    answered (None: all at time 0). Offline requests still running at the end are cancelled
    (their connections close, so the server aborts them); a batch is cancelled and what it
    finished is counted."""
    import httpx

    url = base_url + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    on_recs = _records(online.requests if online is not None else [])
    jobs = offline if not as_batch else []
    clients = len(jobs) if offline_clients is None else min(offline_clients, len(jobs))
    # The offline clients run in a process of their own, as they would on other machines: in
    # the online clients' event loop, reading 256 offline streams delayed the online chunks'
    # timestamps, so the online requests' measured latency included the load generator's.
    senders = OfflineSenders(url, headers, model, jobs, clients) if jobs else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    _freeze_heap()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(3600, connect=60)) as c:
        t0, t0_monotonic = time.perf_counter(), time.monotonic()
        if senders is not None:
            senders.start(t0)
        batch_task = None
        if as_batch and offline:
            batch_task = asyncio.create_task(_submit_batch(c, base_url, headers, offline, model))
        lead = ONLINE_LEAD_S if senders is not None else 0.0
        await asyncio.sleep(lead)
        await _online_part(c, url, headers, model, online, on_recs, t0 + lead, window_s)
        window = time.perf_counter() - t0
        off_recs = senders.stop() if senders is not None else []
        done = None
        if batch_task is not None:
            done = await _cancel_batch(c, base_url, headers, await batch_task)
    return Window(on_recs, off_recs, window, t0_monotonic, done, lead)


def _freeze_heap() -> None:
    """Keep what the clients' process holds before the run (imports, the prepared requests)
    out of the garbage collector's sight: a full collection walking it takes tens of ms, and
    would show up in the latencies measured meanwhile."""
    gc.collect()
    gc.freeze()


async def _offline_client(c, url: str, headers: dict, model: str, queue, t0: float) -> None:
    """Send the job's requests one at a time, taking the next from the shared `queue`."""
    for r, rec in queue:
        body = request_body(r, model, "completions") | {"priority": 1}
        await send_one(c, url, headers, body, rec, t0)


class OfflineSenders:
    """The offline job's clients in a child process: `start(t0)` (a `time.perf_counter()`
    value, the same clock in every process) sets them going once the child is ready, `stop()`
    cancels what is still running (the server aborts those requests) and returns the records,
    one per request of the job (unsent ones untouched)."""

    def __init__(self, url: str, headers: dict, model: str, jobs, clients: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_senders_main,
            args=(child, url, headers, model, list(jobs), clients),
            name="offline-clients",
            daemon=True,
        )
        self.proc.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("the offline clients' process failed to start")

    def start(self, t0: float) -> None:
        self.conn.send(t0)

    def stop(self) -> list[RequestRecord]:
        self.conn.send("stop")
        recs = self.conn.recv()
        self.proc.join(timeout=30)
        return recs


def _senders_main(conn, url: str, headers: dict, model: str, jobs, clients: int) -> None:
    import httpx

    async def run() -> list[RequestRecord]:
        recs = _records(jobs)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(3600, connect=60)
        _freeze_heap()
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as c:
            conn.send("ready")
            t0 = await asyncio.to_thread(conn.recv)
            queue = iter(list(zip(jobs, recs, strict=True)))
            tasks = [
                asyncio.create_task(_offline_client(c, url, headers, model, queue, t0))
                for _ in range(clients)
            ]
            await asyncio.to_thread(conn.recv)  # "stop"
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        return recs

    conn.send(asyncio.run(run()))


# -- the offline job as one batch --------------------------------------------------------------


def batch_jsonl(offline: list[BenchRequest], model: str) -> str:
    """The offline job as a Batch API input file: no streaming, same lengths."""
    lines = []
    for r in offline:
        body = request_body(r, model, "completions")
        body.pop("stream_options")
        line = {
            "custom_id": f"offline-{r.index}",
            "method": "POST",
            "url": "/v1/completions",
            "body": body | {"stream": False},
        }
        lines.append(json.dumps(line) + "\n")
    return "".join(lines)


async def _submit_batch(c, base_url: str, headers: dict, offline, model: str) -> str:
    """Upload the file and create the batch; returns the batch id."""
    f = await c.post(
        base_url + "/v1/files",
        headers=headers,
        files={"file": ("offline.jsonl", batch_jsonl(offline, model).encode())},
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
    await c.post(f"{base_url}/v1/batches/{batch_id}/cancel", headers=headers)
    while True:
        b = (await c.get(f"{base_url}/v1/batches/{batch_id}", headers=headers)).json()
        if b["status"] in ("cancelled", "completed", "failed", "expired"):
            break
        await asyncio.sleep(0.2)
    done = {"batch_status": b["status"], "lines": 0, "prompt_tokens": 0, "output_tokens": 0}
    done["total_lines"] = (b.get("request_counts") or {}).get("total")
    if b.get("output_file_id"):
        out = await c.get(f"{base_url}/v1/files/{b['output_file_id']}/content", headers=headers)
        for line in out.text.splitlines():
            usage = json.loads(line)["response"]["body"].get("usage") or {}
            done["lines"] += 1
            done["prompt_tokens"] += usage.get("prompt_tokens", 0)
            done["output_tokens"] += usage.get("completion_tokens", 0)
    return done


# -- one server, one run -----------------------------------------------------------------------


def one_run(
    server: LaunchedServer,
    online: OnlineLoad | None,
    offline: list[BenchRequest],
    warm: BenchRequest,
    step_log: Path | None = None,
    window_s: float | None = None,
    as_batch: bool = False,
    offline_clients: int | None = None,
) -> RunResult:
    """Wait for the server, warm it up with one short request (not measured), drive the
    window, read its counters and step log, and stop it."""
    try:
        server.wait_healthy(900)
        model = served_model(server.base_url, None)
        asyncio.run(run_mixed(server.base_url, model, TraceLoad([warm]), []))
        info = _version(server.base_url)
        before, steal = scrape(server.base_url), cpu_steal_s()
        w = asyncio.run(
            run_mixed(
                server.base_url, model, online, offline, None, window_s, as_batch, offline_clients
            )
        )
        after, steal_after = scrape(server.base_url), cpu_steal_s()
    finally:
        server.stop()
    engine = {k: after[k] - before.get(k, 0.0) for k in after}
    steps = None
    if step_log is not None and step_log.exists():
        lead = w.lead_s  # the step log is summarised over the part with online load
        steps = step_log_summary(step_log, w.t0_monotonic + lead, w.window_s - lead)
    stolen = None if steal is None or steal_after is None else steal_after - steal
    return RunResult(
        w.online, w.offline, w.window_s, engine, steps, w.batch, info, w.lead_s, stolen
    )


def _version(base_url: str) -> dict[str, Any] | None:
    """The server's /version (conserve: policy and SLOs in force), when it has one."""
    import httpx

    try:
        r = httpx.get(base_url + "/version", timeout=30)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
