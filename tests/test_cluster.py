"""Scale-out on Ray, end to end: `conserve serve --replicas 2` (one thread each) on a local Ray
instance on the loopback address, the default model, the official `openai` client.

Covers: both API shapes through the one endpoint; prefix affinity visible in per-replica
metrics; a replica SIGKILLed in the middle of a 200-line batch (every custom_id exactly once,
online requests meanwhile answered or failed with an OpenAI error, the replica back); the KV
integrity check on every replica at the end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time

import httpx
import openai
import pytest
from conftest import API_KEY, start_server, stop_server
from test_batch_api import CHAT, jsonl, lines_of, req, wait

pytest.importorskip("ray", reason="the cluster tests need the ray extra (make test installs it)")

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def cluster():
    # Ray writes a session directory and an auth token (under HOME): both into temporary
    # directories, never the user's. A short path: Ray's socket paths must stay short.
    ray_tmp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")
    home = tempfile.mkdtemp(prefix="conserve-ray-home-")
    proc, base = start_server(
        "--replicas", "2", "--threads", "1", "--max-num-seqs", "16",
        env_extra={"RAY_TMPDIR": ray_tmp, "HOME": home},
    )  # fmt: skip
    yield base
    stop_server(proc)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    out = proc.stdout.read() if proc.stdout else ""
    assert "Traceback" not in out, out[-4000:]


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=10).json()


def metric(base: str, name: str, **labels: str) -> dict[str, float]:
    """replica -> value of `name` with `labels`, from /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            out[got["replica"]] = float(m.group(2))
    return out


def test_two_replicas_serve_the_openai_api(cluster, client, model):
    h = health(cluster)
    assert h["status"] == "ok"
    assert [r["status"] for r in h["replicas"]] == ["up", "up"]
    assert len({r["pid"] for r in h["replicas"]}) == 2
    assert all(r["address"].startswith("127.0.0.1:") for r in h["replicas"]), h  # loopback
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, stream=True)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason in ("length", "stop")
    # bad input: the OpenAI error object, through the front door
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    assert e.value.body["param"] == "temperature" or "temperature" in str(e.value)


def test_same_prefix_offline_requests_land_on_one_replica(cluster, client, model):
    before_routed = metric(
        cluster, "conserve:replica_requests_routed_total", **{"class": "offline"}
    )
    before_hits = metric(cluster, "conserve:replica_prefix_cache_hits_total")
    system = "You answer questions about rivers and bridges in one short sentence. " * 12
    for i in range(6):  # one after the other: the load never pulls them apart
        client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Q{i}"}],
            max_tokens=2,
            service_tier="flex",
        )
    routed = metric(cluster, "conserve:replica_requests_routed_total", **{"class": "offline"})
    hits = metric(cluster, "conserve:replica_prefix_cache_hits_total")
    sent = {r: routed.get(r, 0) - before_routed.get(r, 0) for r in ("0", "1")}
    gained = {r: hits.get(r, 0) - before_hits.get(r, 0) for r in ("0", "1")}
    home = max(sent, key=sent.get)
    other = "1" if home == "0" else "0"
    assert sent == {home: 6, other: 0}, sent
    # five of the six found the shared system prompt cached on that replica
    assert gained[home] >= 5 * 128 and gained[other] == 0, gained


def _online_during(base: str, model: str, stop: threading.Event, outcomes: list) -> None:
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    while not stop.is_set():
        try:
            r = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=4
            )
            outcomes.append(("ok", r.choices[0].finish_reason))
        except openai.APIStatusError as e:  # must be an OpenAI error object
            outcomes.append(("error", e.status_code, e.body["type"] if e.body else None))
        time.sleep(0.1)


def test_replica_killed_mid_batch_every_line_exactly_once(cluster, client, model):
    rows = [
        req(f"line-{i}", {"model": model, "max_tokens": 8 + (i * 7) % 40, "temperature": 0,
                          "messages": [{"role": "user", "content": f"Tell me about item {i}."}]})
        for i in range(200)
    ]  # fmt: skip
    file_id = client.files.create(file=("input.jsonl", jsonl(rows)), purpose="batch").id
    b = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    deadline = time.monotonic() + 300
    while client.batches.retrieve(b.id).request_counts.completed < 30:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.batches.retrieve(b.id).request_counts.completed < 170, "the batch ran too fast"
    victim = health(cluster)["replicas"][0]
    stop, outcomes = threading.Event(), []
    online = threading.Thread(target=_online_during, args=(cluster, model, stop, outcomes))
    online.start()
    os.kill(victim["pid"], signal.SIGKILL)
    try:
        # the front door stays up while the replica is gone
        seen_down = False
        while not seen_down and time.monotonic() < deadline:
            h = health(cluster)
            assert h["status"] == "ok", h
            seen_down = h["replicas"][0]["status"] != "up" or h["replicas"][0]["restarts"] > 0
            time.sleep(0.05)
        assert seen_down
        done = wait(client, b.id, t=300)
    finally:
        stop.set()
        online.join()
    assert done.status == "completed", done
    out = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert set(out) == {f"line-{i}" for i in range(200)} and not errors
    assert all(r["response"]["status_code"] == 200 for r in out.values())
    assert done.request_counts.completed == 200 and done.request_counts.failed == 0
    # online requests during the loss: answered, or an OpenAI error (503, retryable)
    assert outcomes and all(o[0] == "ok" or (o[1] == 503 and o[2]) for o in outcomes), outcomes
    assert any(o[0] == "ok" for o in outcomes)
    # the replica comes back in a new process, and takes requests again
    while time.monotonic() < deadline:
        r0 = health(cluster)["replicas"][0]
        if r0["status"] == "up":
            break
        time.sleep(0.2)
    assert r0["status"] == "up" and r0["restarts"] == 1 and r0["pid"] != victim["pid"], r0
    assert metric(cluster, "conserve:replica_up") == {"0": 1.0, "1": 1.0}


def test_every_replica_passes_the_kv_integrity_check(cluster, client, model):
    deadline = time.monotonic() + 60
    while True:
        kv = httpx.get(f"{cluster}/debug/kv", headers=AUTH, timeout=10).json()
        if kv["running"] == 0 and kv["waiting"] == 0:
            break
        assert time.monotonic() < deadline, kv
        time.sleep(0.2)
    assert kv["integrity_error"] is None, kv
    assert json.dumps(health(cluster)["replicas"])  # both listed
