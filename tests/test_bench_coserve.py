"""`conserve bench coserve`: the offline job's mix, token accounting inside the window, and a
short mixed run against the real server (offline requests cancelled when online ends)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from conftest import API_KEY

from conserve.bench.coserve import (
    offline_job,
    offline_tokens,
    run_mixed,
    step_log_summary,
    token_times,
)
from conserve.bench.serve import BenchRequest, PromptMaker, RequestRecord, served_model


def test_offline_job_mixes_three_kinds_with_shared_few_shot_prefixes(default_tokenizer):
    maker = PromptMaker(default_tokenizer, 0)
    job, desc = offline_job(30, maker, 0)
    assert desc["offline_kinds"] == {"summary": 10, "generation": 10, "few-shot": 10}
    summaries, gens, shots = job[0::3], job[1::3], job[2::3]
    assert all(r.prompt_len >= 700 and r.output_len <= 24 for r in summaries)
    assert all(r.prompt_len <= 96 and r.output_len >= 128 for r in gens)
    assert all(r.output_len <= 4 for r in shots)
    prefixes = {tuple(r.prompt[:600]) for r in shots}
    assert 1 < len(prefixes) <= 4  # a few shared few-shot prefixes
    again, _ = offline_job(30, PromptMaker(default_tokenizer, 0), 0)
    assert [r.prompt for r in again] == [r.prompt for r in job]  # seeded


def test_offline_tokens_count_only_what_arrived_inside_the_window():
    rec = RequestRecord(0, 100, 10, 0.0, sent_s=1.0, ttft_s=2.0, itl_s=[1.0, 1.0, 1.0])
    assert token_times(rec) == [3.0, 4.0, 5.0, 6.0]
    assert offline_tokens(rec, 4.5) == 100 + 2
    assert offline_tokens(rec, 2.5) == 0  # not started inside the window: no prompt credit
    assert offline_tokens(RequestRecord(1, 50, 5, 0.0), 10.0) == 0


def test_mixed_run_against_the_server_cancels_offline_work_at_the_end(server, default_tokenizer):
    maker = PromptMaker(default_tokenizer, 1)
    model = served_model(server, API_KEY)
    online = [BenchRequest(i, 0.3 * i, maker.ids(40), 40, 8) for i in range(2)]
    offline = [BenchRequest(i, 0.0, maker.ids(30), 30, 400) for i in range(3)]
    on, off, window, _ = asyncio.run(run_mixed(server, model, online, offline, API_KEY))
    assert all(r.ok and r.output_tokens == 8 for r in on)
    assert window >= max(r.sent_s + r.e2e_s for r in on) - 1e-6
    # 400 tokens each would take far longer than the online requests: cut off, not finished
    assert all(not r.ok for r in off)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = httpx.get(f"{server}/debug/kv", headers=headers, timeout=10).json()
        if state["kv_tables"] == 0 and state["running"] == 0 and state["waiting"] == 0:
            break
        time.sleep(0.2)
    assert state["kv_tables"] == 0 and state["integrity_error"] is None


def test_step_log_summary_explains_an_online_wait(tmp_path):
    """A hand-written step log: an online request reaches the engine while an offline step
    runs, that step is stopped, its own prefill runs next. The summary gives the engine's part
    of its TTFT, the offline time it waited behind, and the compute the stop threw away."""
    recs = [
        {"t": 10.0, "added": "off", "class": "offline", "prompt_len": 800},
        {"t": 10.0, "plan_s": 0.001, "run_s": 0.5, "apply_s": 0.002, "predicted_s": 0.4,
         "online": [0, 0], "offline": [1, 512], "online_prefill_ids": [],
         "stopped_at_layer": None},
        {"t": 10.6, "added": "on", "class": "online", "prompt_len": 40},
        {"t": 10.51, "plan_s": 0.001, "run_s": 0.15, "apply_s": 0.0, "predicted_s": 0.4,
         "online": [0, 0], "offline": [1, 288], "online_prefill_ids": [],
         "stopped_at_layer": 9},
        {"t": 10.7, "plan_s": 0.001, "run_s": 0.05, "apply_s": 0.01, "predicted_s": 0.05,
         "online": [1, 40], "offline": [0, 0], "online_prefill_ids": ["on"],
         "stopped_at_layer": None},
        {"t": 99.0, "plan_s": 0.001, "run_s": 0.05, "apply_s": 0.0, "predicted_s": 0.05,
         "online": [0, 0], "offline": [1, 1], "online_prefill_ids": [],
         "stopped_at_layer": None},  # after the window: not counted
    ]  # fmt: skip
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = step_log_summary(path, t0=9.0, window=5.0)
    assert s["steps"] == 3 and s["stopped_steps"] == 1
    assert s["stopped_compute_s"] == 0.15
    assert abs(s["engine_ttft_ms"]["max"] - 160.0) < 1e-6  # 10.6 -> 10.76
    assert abs(s["offline_blocking_ms"]["max"] - 60.0) < 1e-6  # 10.6 -> 10.66 behind offline
    assert s["busy_s"] == {"online only": 0.05, "mixed": 0.0, "offline only": 0.5}
    # the median of |0.4 - 0.5| / 0.5 and |0.05 - 0.05| / 0.05
    assert abs(s["prediction_error_median"] - 0.1) < 1e-9
