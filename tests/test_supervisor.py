"""The engine supervisor: a SIGKILLed engine core is replaced, requests in flight get a
retryable OpenAI error, and a batch that was running completes with every line exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest
from conftest import API_KEY, start_server, stop_server

from conserve.server.supervisor import Backoff, EngineFactory

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LINES = 200


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_healthy_run():
    clock = FakeClock()
    b = Backoff(first=1, cap=60, healthy_s=120, clock=clock)
    pauses = []
    for _ in range(8):
        pauses.append(b.pause())
        clock.t += 5  # failing again soon after each restart
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60]
    clock.t += 119  # 124 s since the last failure: healthy long enough
    assert b.pause() == 1
    clock.t += 30
    assert b.pause() == 2


def test_a_restart_reuses_the_profile_the_engine_ran_with(monkeypatch, tmp_path):
    """An engine that measured its profile ("auto") hands it over: the restart does not
    measure again (nor load the tokenizer again). An explicit profile path is left alone."""
    from conserve.config import EngineConfig
    from conserve.server import supervisor

    made: list[str] = []
    given: list = []

    class FakeClient:
        def __init__(self, config, tokenizer=None) -> None:
            made.append(config.latency_profile)
            given.append(tokenizer)
            self.latency_profile = '{"coef": [1]}'
            self.tokenizer = tokenizer or object()

    monkeypatch.setattr(supervisor, "EngineClient", FakeClient)
    factory = EngineFactory(EngineConfig())
    factory()
    factory()
    assert made[0] == "auto" and made[1] != "auto"
    assert given[0] is None and given[1] is not None  # the first tokenizer, reused
    with open(made[1]) as f:
        assert f.read() == '{"coef": [1]}'
    factory.close()
    assert not os.path.exists(made[1])
    explicit = EngineFactory(EngineConfig(latency_profile=str(tmp_path / "p.json")))
    explicit()
    explicit()
    assert made[2:] == [str(tmp_path / "p.json")] * 2


def _batch_rows(model: str) -> bytes:
    rows = []
    for i in range(LINES):
        body = {
            "model": model,
            "prompt": f"Line {i}: once upon a time",
            # lines of different lengths finish at different times, so the kill lands while
            # some are done and others run
            "max_tokens": 4 + i % 48,
            "ignore_eos": True,
            "temperature": 0,
        }
        rows.append(
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body}
        )
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def _health(base: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{base}/health", timeout=5)
    except httpx.HTTPError:
        return None


def _wait_health(base: str, code: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = _health(base)
        if r is not None and r.status_code == code:
            return r.json()
        assert time.monotonic() < deadline, f"/health never answered {code}"
        time.sleep(0.1)


def _stream_until_error(client: openai.OpenAI, model: str, out: dict) -> None:
    try:
        for _chunk in client.completions.create(
            model=model,
            prompt="Tell a long story",
            max_tokens=2000,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            out["tokens"] = out.get("tokens", 0) + 1
            out["started"].set()
    except openai.APIError as e:
        out["error"] = e
    finally:
        out["started"].set()


@pytest.fixture
def data_server(tmp_path):
    proc, base = start_server("--data-dir", str(tmp_path / "data"))
    yield proc, base
    stop_server(proc)


def test_sigkilled_engine_restarts_and_the_batch_completes_exactly_once(data_server):
    proc, base = data_server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    first_pid = _wait_health(base, 200, 10)["engine_pid"]
    file_id = client.files.create(file=("in.jsonl", _batch_rows(model)), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 600
    while client.batches.retrieve(batch.id).request_counts.completed < 10:
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.05)
    # an online stream in flight at the kill (started once some lines are done: while it
    # streams, the batch gets only the seats and time the stream leaves)
    online: dict = {"started": threading.Event()}
    streamer = threading.Thread(target=_stream_until_error, args=(client, model, online))
    streamer.start()
    assert online["started"].wait(120)

    os.kill(first_pid, signal.SIGKILL)
    assert _wait_health(base, 503, 30)["status"] in ("restarting", "engine dead")
    done_at_kill = client.batches.retrieve(batch.id).request_counts.completed
    assert 0 < done_at_kill < LINES  # the kill landed mid-batch
    streamer.join(60)
    err = online.get("error")
    assert err is not None, "the stream in flight did not get an error"
    assert "retry" in str(err.message) and "engine failed" in str(err.message)

    health = _wait_health(base, 200, 60)  # acceptance: healthy again within 60 s
    assert health["engine_pid"] != first_pid
    answer = client.completions.create(model=model, prompt="Hello", max_tokens=4)
    assert answer.choices[0].text is not None and answer.usage.completion_tokens == 4
    metrics = httpx.get(f"{base}/metrics").text
    assert "conserve:engine_restarts_total 1.0" in metrics

    deadline = time.monotonic() + 600
    while (b := client.batches.retrieve(batch.id)).status != "completed":
        assert b.status in ("in_progress", "finalizing"), b
        assert time.monotonic() < deadline, b
        time.sleep(0.2)
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    errors = []
    if b.error_file_id:
        errors = client.files.content(b.error_file_id).text.splitlines()
    ids = [r["custom_id"] for r in out]
    assert errors == [] and len(ids) == LINES and set(ids) == {f"c{i}" for i in range(LINES)}
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert b.request_counts.completed == LINES and b.request_counts.failed == 0
    kv = httpx.get(f"{base}/debug/kv").json()
    assert kv["integrity_error"] is None and kv["running"] == 0


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_host_kv_path_restores_a_retried_offline_prompt_after_a_restart(tmp_path):
    """`--host-kv-path`: an offline request's checkpointed prompt KV outlives a SIGKILL of the
    engine core; the retried request copies it back instead of computing it, and its greedy
    output is the one computed from scratch before (float32)."""
    proc, base = start_server("--data-dir", str(tmp_path / "data"), "--dtype", "float32",
                              "--host-kv-path", str(tmp_path / "host-kv"))  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
        model = client.models.list().data[0].id
        prompt = " ".join(
            f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(25)
        )
        greedy = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
        reference = client.completions.create(**greedy).choices[0].text  # computed from scratch
        first_pid = _wait_health(base, 200, 10)["engine_pid"]
        offline: dict = {"started": threading.Event()}

        def stream() -> None:
            try:
                for _ in client.completions.create(
                    **greedy | {"max_tokens": 4000, "stream": True},
                    extra_body={"ignore_eos": True, "service_tier": "flex"},
                ):
                    offline["tokens"] = offline.get("tokens", 0) + 1
                    if offline["tokens"] >= 3:
                        offline["started"].set()
            except openai.APIError as e:
                offline["error"] = e
            finally:
                offline["started"].set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert offline["started"].wait(120) and "error" not in offline
        time.sleep(0.5)  # a few more steps: the checkpoints follow the steps
        os.kill(first_pid, signal.SIGKILL)
        streamer.join(60)
        assert "engine failed" in str(offline["error"].message)
        _wait_health(base, 200, 60)
        before = _metric(base, "conserve:restored_tokens_total")
        retried = client.completions.create(**greedy, extra_body={"service_tier": "flex"})
        restored = _metric(base, "conserve:restored_tokens_total") - before
        prompt_len = retried.usage.prompt_tokens
        assert restored >= (prompt_len - 1) // 16 * 16 - 16  # its prompt came back, not computed
        assert retried.choices[0].text == reference
        kv = httpx.get(f"{base}/debug/kv").json()
        assert kv["integrity_error"] is None and kv["running"] == 0
    finally:
        stop_server(proc)
