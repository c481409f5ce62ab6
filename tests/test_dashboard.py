"""The dashboard: its windowed figures on made-up numbers, `/dashboard/data` over a fake engine,
and the real page in headless Chromium against the real server while online chats, offline
`flex` requests and a batch job run (driven over the Chrome DevTools Protocol).

The browser test needs Debian's `chromium` (`make browser`); without it the test fails, unless
CONSERVE_ALLOW_NO_BROWSER=1 says to skip it. With CONSERVE_DASHBOARD_SHOT=path the screenshot is
also written there (docs/dashboard.png is made that way)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import API_KEY, start_server, stop_server
from fastapi.testclient import TestClient

from conserve.batch.manager import BatchManager
from conserve.batch.store import BatchRow, Counts
from conserve.core.messages import Stats
from conserve.server import dashboard
from conserve.server.app import create_app
from conserve.server.dashboard import (
    Counters,
    attainment,
    baseline,
    eta_seconds,
    harvest,
    page_html,
)
from conserve.server.recent import RecentRequests, percentile
from conserve.server.state import ServerSettings, ServerState

CHARTS = ("ttft", "tpot", "slo", "offline", "kv", "preempt")


# -- windows and percentiles on made-up numbers -------------------------------------------------
def test_percentiles_by_nearest_rank():
    values = [float(i) for i in range(1, 101)]  # 1 .. 100
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0  # unsorted input


def test_recent_requests_window_and_bounds():
    log = RecentRequests(limit=4, keep_s=100)
    # admitted at 0, first token at 0.5, last of 5 tokens at 1.5: TTFT 0.5, TPOT 0.25
    log.add("online", 0.0, 0.5, 1.5, 5, now=1.5)
    log.add("offline", 0.0, 2.0, 2.0, 1, now=2.0)  # one token: no TPOT
    log.add("online", 1.0, None, None, 0, now=3.0)  # no token at all
    first = log.window(10, now=3.0)[0]
    assert (first.ttft, first.tpot, first.tokens) == (0.5, 0.25, 5)
    assert log.window(10, now=3.0)[1].tpot is None
    assert [f.klass for f in log.window(1.2, now=3.0)] == ["offline", "online"]
    for i in range(4):
        log.add("online", 50.0, 50.1, 50.2, 2, now=50.0 + i)
    assert len(log.window(1000, now=53.0)) == 4  # bounded by count
    log.add("online", 200.0, 200.1, 200.2, 2, now=200.0)
    assert len(log.window(1000, now=200.0)) == 1  # older than keep_s: dropped


def counters(mono: float, **kw) -> Counters:
    return Counters(mono, **kw)


def test_baseline_is_the_newest_snapshot_a_window_old_or_the_oldest():
    history = [counters(0.0), counters(50.0), counters(70.0), counters(100.0)]
    assert baseline(history, 100.0, 30.0).mono == 70.0
    assert baseline(history, 100.0, 50.0).mono == 50.0
    assert baseline(history, 100.0, 500.0).mono == 0.0  # not that old: the oldest


def test_attainment_between_two_snapshots():
    old = counters(0.0, objectives={"ttft": (10, 2), "tpot": (5, 0)})
    new = counters(60.0, objectives={"ttft": (19, 3), "tpot": (5, 0)})
    a = attainment(new, old)
    assert a["ttft"] == {"met": 9, "missed": 1, "attainment": 0.9}
    assert a["tpot"] == {"met": 0, "missed": 0, "attainment": None}


def test_harvest_rate_and_ceiling():
    old = counters(
        100.0,
        online_busy_s=10.0,
        offline_only_busy_s=20.0,
        offline_only_tokens=20_000,
        offline_computed_tokens=25_000,
    )
    # in 10 s: online steps 4 s, offline-only steps 5 s computing 6000 tokens, 7000 in all
    new = counters(
        110.0,
        online_busy_s=14.0,
        offline_only_busy_s=25.0,
        offline_only_tokens=26_000,
        offline_computed_tokens=32_000,
    )
    h = harvest(new, old)
    assert h["offline_tokens_per_s"] == pytest.approx(700.0)
    assert h["online_busy"] == pytest.approx(0.4)
    # alone: 1200 tokens/s, over the 60% of the window online work left
    assert h["ceiling_tokens_per_s"] == pytest.approx(720.0)
    # no offline-only step in the window: the rate alone since the start (26000 / 25 s)
    idle = counters(120.0, online_busy_s=19.0, offline_only_busy_s=25.0,
                    offline_only_tokens=26_000, offline_computed_tokens=32_500)  # fmt: skip
    h = harvest(idle, new)
    assert h["ceiling_tokens_per_s"] == pytest.approx(1040.0 * 0.5)
    assert h["offline_tokens_per_s"] == pytest.approx(50.0)
    # nothing offline ever: no ceiling to tell
    assert harvest(counters(5.0, online_busy_s=1.0), counters(0.0))["ceiling_tokens_per_s"] is None
    # two replicas: busy seconds are summed over both, and so is the ceiling
    two = harvest(replace(new, engines=2), replace(old, engines=2))
    assert two["online_busy"] == pytest.approx(0.2)
    assert two["ceiling_tokens_per_s"] == pytest.approx(1200.0 * 2 * 0.8)


def test_batch_time_left_from_its_recent_progress():
    # 10 lines per second over the last minute; 600 left
    progress = [(0.0, 0), (100.0, 100), (130.0, 400), (160.0, 700)]
    assert eta_seconds(progress, 1300, window=60.0) == pytest.approx(60.0)
    assert eta_seconds(progress, 700, window=60.0) == 0.0  # all done
    assert eta_seconds([(0.0, 0), (10.0, 0)], 50, window=60.0) is None  # no progress yet
    assert eta_seconds([], 50, window=60.0) is None


# -- /dashboard and /dashboard/data over a fake engine ------------------------------------------
class FakeClient:
    """What the app reads of an EngineClient, with stats the test sets."""

    def __init__(self) -> None:
        self.model_name, self.policy, self.max_model_len = "fake-model", "conserve", 2048
        self.ttft_slo, self.tpot_slo, self.slo_slack = None, 0.05, 0.05
        self.config = SimpleNamespace(cache=SimpleNamespace(host_kv_gb=0.25))
        self.alive = True
        self.on_ray, self.num_replicas = False, 1
        self.stats_calls = 0
        self.next = fake_stats()

    def start(self, loop) -> None:
        pass

    def shutdown(self) -> None:
        pass

    async def stats(self) -> Stats:
        self.stats_calls += 1
        return self.next


def fake_stats(**kw) -> Stats:
    base = dict(
        running=3,
        waiting=1,
        kv_usage=0.25,
        kv_tables=3,
        by_class={"online": (1, 0), "offline": (2, 1)},
        num_preemptions=2,
        prefix_queries=0,
        prefix_hits=0,
        step_times=[0.01, 0.02],
        integrity_error=None,
        preemptions_by_kind={"recompute_online": 0, "recompute_offline": 2, "layer": 5},
        online_objectives={"ttft": (8, 2), "tpot": (9, 1)},
        online_busy_s=1.0,
        offline_only_busy_s=2.0,
        offline_only_tokens=3000,
        offline_computed_tokens=3500,
        host_kv_usage=0.5,
    )
    return Stats(**(base | kw))


def test_counts_continue_across_an_engine_restart(monkeypatch):
    """A restarted engine counts from zero again: the dashboard adds its counts to what the
    old engine had reached, so no rate goes negative."""
    monkeypatch.setattr(dashboard, "SNAPSHOT_EVERY_S", 0.0)
    state = ServerState()
    state.client = first = FakeClient()
    board = dashboard.Dashboard(state)
    before = asyncio.run(board.snapshot()).counters
    assert before.offline_computed_tokens == 3500 and before.objectives["ttft"] == (8, 2)
    state.client = second = FakeClient()  # what the supervisor does after a restart
    second.next = fake_stats(
        online_objectives={"ttft": (1, 0)}, offline_computed_tokens=10, online_busy_s=0.5
    )
    after = asyncio.run(board.snapshot()).counters
    assert after.offline_computed_tokens == 3510 and after.online_busy_s == 1.5
    assert after.objectives == {"ttft": (9, 2), "tpot": (9, 1)}
    assert first.stats_calls == 1 and second.stats_calls == 1


def test_dashboard_data_shape_over_a_fake_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "SNAPSHOT_EVERY_S", 3600.0)  # one snapshot, reused
    fake = FakeClient()
    state = ServerState()
    app = create_app(lambda: fake, ServerSettings(), state)
    with TestClient(app) as http:
        # (after the start-up, which would resume its batches through the engine)
        state.batches = manager = BatchManager(tmp_path)
        manager.store.add_batch(
            BatchRow(
                "batch_x",
                "file-1",
                "/v1/chat/completions",
                "24h",
                None,
                "m",
                "in_progress",
                int(time.time()),
                int(time.time()) + 86400,
            )
        )
        manager.store.set_counts("batch_x", Counts(total=40, completed=10, failed=2))
        now = time.monotonic()
        state.recent.add("online", now - 1.0, now - 0.9, now - 0.5, 5, now=now)  # TTFT 0.1 s
        state.recent.add("offline", now - 3.0, now - 2.0, now - 1.0, 11, now=now)
        page = http.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "conserveDashboard" in page.text
        d = http.get("/dashboard/data", params={"window": 60}).json()
        since = {"since": d["history"][-1]["t"]}
        again = http.get("/dashboard/data", params=since).json()
        assert fake.stats_calls == 1  # the snapshot is not old enough to take another
        monkeypatch.setattr(dashboard, "SNAPSHOT_EVERY_S", 0.0)
        fake.next = fake_stats(kv_usage=0.5)
        later = http.get("/dashboard/data", params=since).json()
        assert http.get("/dashboard/data", params={"window": 1}).status_code == 400
        metrics = http.get("/metrics").text
    assert d["engine_alive"] is True and d["window_s"] == 60
    assert d["server"] == {
        "version": d["server"]["version"],
        "batch_api": True,
        "model": "fake-model",
        "policy": "conserve",
        "ttft_slo": None,
        "tpot_slo": 0.05,
        "slo_slack": 0.05,
        "objectives": "TTFT as if alone +5%, TPOT 0.05 s",
        "host_tier": True,
    }
    assert d["online"]["requests"] == 1
    assert d["online"]["ttft"]["p50"] == pytest.approx(0.1, abs=1e-6)
    assert d["online"]["tpot"]["p99"] == pytest.approx(0.1, abs=1e-6)  # 0.4 s / 4 tokens
    assert d["offline"]["requests"] == 1
    # every engine counter started at zero when the server started: the window covers it
    assert d["objectives"]["ttft"] == {"met": 8, "missed": 2, "attainment": 0.8}
    assert d["objectives_total"]["tpot"]["attainment"] == 0.9
    assert d["offline"]["offline_tokens_per_s"] > 0
    assert d["offline"]["ceiling_tokens_per_s"] is not None
    assert d["kv"] == {"device_usage": 0.25, "host_usage": 0.5}
    assert d["queues"] == {
        "online": {"running": 1, "waiting": 0},
        "offline": {"running": 2, "waiting": 1},
    }
    assert d["preemptions"] == {"recompute_online": 0, "recompute_offline": 2, "layer": 5}
    (batch,) = d["batches"]
    assert batch | {"created_at": 0} == {
        "id": "batch_x",
        "status": "in_progress",
        "total": 40,
        "completed": 10,
        "failed": 2,
        "eta_s": None,  # one look at it: no rate yet
        "created_at": 0,
    }
    (point,) = d["history"]
    assert set(point) == {
        "t", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "tpot_p99",
        "ttft_attainment", "tpot_attainment", "offline_tps", "ceiling_tps", "kv_usage",
        "host_kv_usage", "preemptions",
    }  # fmt: skip
    assert point["ttft_attainment"] == 0.8 and point["host_kv_usage"] == 0.5
    assert again["history"] == []  # nothing newer than the point already held
    assert [p["kv_usage"] for p in later["history"]] == [0.5]  # only the new one
    # the engine's new counters are exported too
    for line in (
        'conserve:online_objective_total{objective="ttft",result="met"} 8.0',
        'conserve:online_objective_total{objective="tpot",result="missed"} 1.0',
        "conserve:online_busy_seconds_total 1.0",
        "conserve:offline_only_busy_seconds_total 2.0",
        "conserve:offline_only_tokens_total 3000.0",
        "conserve:offline_computed_tokens_total 3500.0",
        "conserve:host_kv_usage_perc 0.5",
    ):
        assert line in metrics


def test_the_page_is_package_data():
    html = page_html()
    assert html.startswith("<!doctype html>") and "window.conserveDashboard" in html
    # nothing fetched from elsewhere: the only address is the SVG namespace
    assert "<script src" not in html and "<link" not in html
    assert set(re.findall(r"https?://[^\s\"'`)]+", html)) == {"http://www.w3.org/2000/svg"}


# -- the real page in headless Chromium ---------------------------------------------------------
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path:
        return path
    if os.environ.get("CONSERVE_ALLOW_NO_BROWSER") == "1":
        pytest.skip("chromium is not installed (CONSERVE_ALLOW_NO_BROWSER=1 allows the skip)")
    pytest.fail(
        "chromium is not installed: `make browser` (or `apt-get install -y chromium`) installs "
        "Debian's package; CONSERVE_ALLOW_NO_BROWSER=1 skips this test instead"
    )


class DevTools:
    """Headless Chromium driven over the DevTools Protocol (one page, flat sessions)."""

    def __init__(self, ws, session: str | None = None) -> None:
        self.ws, self.session, self.next_id = ws, session, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        while True:  # events in between are not needed
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def evaluate(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")


def launch_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    """Start headless Chromium; returns the process and its browser websocket URL."""
    proc = subprocess.Popen(
        [
            chromium_path(),
            "--headless=new",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--no-sandbox",
            "--no-first-run",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = port_file.read_text().split("\n") if port_file.exists() else []
        if len(lines) >= 2 and lines[0].strip() and lines[1].strip():
            return proc, f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("chromium did not write DevToolsActivePort in time")


async def drive_page(browser_ws: str, url: str, ready, shot: Path) -> dict:
    """Open `url` at 1280x900, wait (bounded, generous) until `ready(conserveDashboard)` holds
    and the page updated twice more, then screenshot it to `shot`. Returns the final state
    (`window.conserveDashboard`)."""
    import websockets

    async with websockets.connect(browser_ws, max_size=None) as ws:
        browser = DevTools(ws)
        target = await browser.call("Target.createTarget", url="about:blank")
        attached = await browser.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = DevTools(ws, attached["sessionId"])
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        await page.call("Page.enable")
        await page.call("Page.navigate", url=url)
        state = await wait_for(page, ready, 900)
        final = await wait_for(page, lambda s: s["updates"] >= state["updates"] + 2, 60)
        png = await page.call("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(png["data"]))
        await browser.call("Browser.close")
        return final


async def wait_for(page: DevTools, ready, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        raw = await page.evaluate("JSON.stringify(window.conserveDashboard || null)")
        state = json.loads(raw) if raw else None
        if state and ready(state):
            return state
        await asyncio.sleep(0.5)
    raise AssertionError(f"the page did not get there in {timeout} s; its state: {state}")


def page_ready(s: dict) -> bool:
    charts = s["charts"]
    return (
        s["updates"] >= 2
        and s["error"] is None
        and all(charts.get(name, 0) > 0 for name in CHARTS)
        and s["batchRows"] >= 1
    )


class Traffic:
    """Online streaming chats, offline `flex` requests and one batch job, in threads, for about
    `seconds` (bounded: each thread stops by itself)."""

    def __init__(self, base: str, seconds: float) -> None:
        self.client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
        self.model = self.client.models.list().data[0].id
        self.until = time.monotonic() + seconds
        self.online_done = 0
        self.offline_tokens = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard, args=(f,)) for f in self._work()]

    def _work(self):
        return [self._online, self._online, self._offline, self._offline]

    def _guard(self, work) -> None:
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)

    def chat(self, text: str, **kw):
        return self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": text}], **kw
        )

    def _online(self) -> None:
        n = 0
        while time.monotonic() < self.until and n < 200:
            n += 1
            stream = self.chat(
                f"Tell me about rivers, number {n}.",
                max_tokens=16,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            tokens = sum(1 for c in stream if c.choices and c.choices[0].delta.content)
            assert tokens > 0
            self.online_done += 1
            time.sleep(0.3)

    def _offline(self) -> None:
        n = 0
        while time.monotonic() < self.until and n < 200:
            n += 1
            r = self.chat(
                f"Write a long story about a bridge, part {n}.",
                max_tokens=48,
                extra_body={"service_tier": "flex", "ignore_eos": True},
            )
            self.offline_tokens += r.usage.completion_tokens

    def start_batch(self, lines: int) -> str:
        rows = [
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": self.model,
                    "messages": [{"role": "user", "content": f"Summarize fact number {i}."}],
                    "max_tokens": 24,
                    "ignore_eos": True,
                },
            }
            for i in range(lines)
        ]
        data = "\n".join(json.dumps(r) for r in rows).encode() + b"\n"
        file_id = self.client.files.create(file=("lines.jsonl", data), purpose="batch").id
        return self.client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


@pytest.mark.slow
def test_the_dashboard_in_headless_chromium(tmp_path):
    chromium_path()  # fails (or skips, when allowed) before anything starts
    proc, base = start_server("--data-dir", str(tmp_path / "data"))
    browser = None
    try:
        traffic = Traffic(base, seconds=40)
        batch_id = traffic.start_batch(40)
        for t in traffic.threads:
            t.start()
        browser, browser_ws = launch_chromium(tmp_path / "chromium")
        shot = tmp_path / "dashboard.png"
        # the screenshot shows the whole run: taken once the traffic is over
        done = lambda s: page_ready(s) and not any(t.is_alive() for t in traffic.threads)  # noqa: E731
        final = asyncio.run(drive_page(browser_ws, f"{base}/dashboard", done, shot))
        assert not traffic.errors, traffic.errors
        data = httpx.get(f"{base}/dashboard/data", timeout=30).json()
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
    finally:
        if browser is not None:
            browser.terminate()
            browser.wait(30)
        stop_server(proc)
    assert page_ready(final), final
    png = shot.read_bytes()
    assert png_size(png) == (1280, 900)
    if os.environ.get("CONSERVE_DASHBOARD_SHOT"):
        Path(os.environ["CONSERVE_DASHBOARD_SHOT"]).write_bytes(png)
    # the engine counted an objective for each online chat (16 tokens each: TPOT too), and
    # the batch is the one the page listed
    for objective in ("ttft", "tpot"):
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(f'conserve:online_objective_total{{objective="{objective}"')
        )
        assert counted == traffic.online_done > 0
    assert [b["id"] for b in data["batches"]] == [batch_id]
    assert data["batches"][0]["total"] == 40
    assert data["server"]["policy"] == "conserve" and data["kv"]["device_usage"] >= 0
