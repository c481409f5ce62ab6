"""Server admission and shutdown: 429 when the queue is full, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
from conftest import API_KEY, start_server, stop_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _body(model: str, n_tokens: int, stream: bool = False) -> dict:
    return {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": n_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def test_full_queue_gets_429_with_retry_after():
    # one seat, so that requests really queue behind each other however fast the machine is
    proc, base = start_server("--max-queued-requests", "1", "--max-num-seqs", "1")
    try:
        model = httpx.get(f"{base}/v1/models", headers=AUTH).json()["data"][0]["id"]

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as ac:
                return await asyncio.gather(
                    *(
                        ac.post(f"{base}/v1/completions", json=_body(model, 32), headers=AUTH)
                        for _ in range(8)
                    )
                )

        responses = asyncio.run(run())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 429 in codes, codes
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["Retry-After"] == "1"
        assert limited.json()["error"]["code"] == "queue_full"
        # offline requests have their own limit
        flex = httpx.post(
            f"{base}/v1/completions",
            json=_body(model, 2) | {"service_tier": "flex"},
            headers=AUTH,
            timeout=120,
        )
        assert flex.status_code == 200 and flex.json()["service_tier"] == "flex"
    finally:
        stop_server(proc)


def _wait_for_drain(proc, base: str) -> httpx.Response:
    """Poll /health until it stops saying ok (no fixed wait: the drain is observed)."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the server exited without reporting that it drains"
        r = httpx.get(f"{base}/health", timeout=10)
        if r.json()["status"] != "ok":
            return r
        assert time.monotonic() < deadline, "the server never reported that it drains"
        time.sleep(0.02)


def test_sigterm_drains_running_requests_and_refuses_new_ones():
    # a drain long enough for the running request on a busy machine (a bound, not a wait)
    proc, base = start_server("--shutdown-timeout", "600")
    try:
        model = httpx.get(f"{base}/v1/models", headers=AUTH).json()["data"][0]["id"]
        lines: list[str] = []
        started = threading.Event()
        n_tokens = 200  # long enough to be still running when the drain is seen

        def stream() -> None:
            body = _body(model, n_tokens, True) | {"stream_options": {"include_usage": True}}
            with httpx.stream(
                "POST", f"{base}/v1/completions", json=body, headers=AUTH, timeout=600
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        health = _wait_for_drain(proc, base)
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        assert t.is_alive()  # the drain began while the request was running
        refused = httpx.post(
            f"{base}/v1/completions", json=_body(model, 2), headers=AUTH, timeout=30
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "server_error"
        t.join(600)
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: ") :])["usage"]
        assert usage["completion_tokens"] == n_tokens  # the running request finished
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            stop_server(proc)


def _engine_core_pid(server_pid: int) -> int:
    import subprocess

    children = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True)
    for pid in children.stdout.split():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return int(pid)
    raise AssertionError("engine core process not found")


def test_without_restarts_a_dead_engine_gives_503_not_500():
    import os

    proc, base = start_server("--no-engine-restart")
    try:
        model = httpx.get(f"{base}/v1/models", headers=AUTH).json()["data"][0]["id"]
        assert httpx.get(f"{base}/health").status_code == 200
        os.kill(_engine_core_pid(proc.pid), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert httpx.get(f"{base}/health").json() == {"status": "engine dead"}
        r = httpx.post(f"{base}/v1/completions", json=_body(model, 2), headers=AUTH, timeout=30)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error"
    finally:
        stop_server(proc)


def test_a_request_counts_as_queued_from_admission_until_its_first_token():
    """Requests of a burst are admitted before any of their streams is read: each must see
    the ones before it, or the queue limit lets the whole burst in. A stream never read (the
    client left first) gives its count back when dropped."""
    import gc

    from conserve.core.messages import RequestDelta, SeqDelta
    from conserve.engine.request import RequestClass
    from conserve.server.state import ServerState, tracked

    online = RequestClass.ONLINE
    state = ServerState()

    async def engine_stream():
        yield RequestDelta("r", [SeqDelta(0, "", [], None, None, None)], False, 3, 0, 0)
        yield RequestDelta("r", [SeqDelta(0, "a", [7], None, None, None)], False, 3, 0, 1)
        yield RequestDelta("r", [SeqDelta(0, "b", [8], None, "length", None)], True, 3, 0, 2)

    first, dropped = (
        tracked(state, online, engine_stream()),
        tracked(state, online, engine_stream()),
    )
    assert state.queued[online] == 2  # before either stream is read
    del dropped
    gc.collect()
    assert state.queued[online] == 1

    async def read() -> list[int]:
        seen = []
        async for _ in first:
            seen.append(state.queued[online])
        return seen

    # queued until the delta carrying the first token, then no longer
    assert asyncio.run(read()) == [1, 0, 0]
    assert state.queued[online] == 0 and state.in_flight == 0


def test_the_startup_line_shows_the_slos_whenever_they_are_set():
    from types import SimpleNamespace

    from conserve.server.app import startup_line

    def client(policy, ttft, tpot, slack=None, replicas=0):
        return SimpleNamespace(
            model_name="m", policy=policy, ttft_slo=ttft, tpot_slo=tpot, slo_slack=slack,
            on_ray=replicas > 0, num_replicas=max(replicas, 1),
        )  # fmt: skip

    with_slos = "conserve: model m, policy fcfs, online SLOs: TTFT 1.5 s, TPOT 0.25 s"
    assert startup_line(client("fcfs", 1.5, 0.25)) == with_slos
    assert startup_line(client("fcfs", None, None)) == "conserve: model m, policy fcfs"
    relative = "conserve: model m, policy conserve, online SLOs: TTFT 2 s, TPOT as if alone +15%"
    assert startup_line(client("conserve", 2.0, None, 0.15)) == relative
    assert startup_line(client("fcfs", None, None, replicas=2)).endswith(", 2 replicas on Ray")
    assert startup_line(client("fcfs", None, None, replicas=1)).endswith(", 1 replica on Ray")
