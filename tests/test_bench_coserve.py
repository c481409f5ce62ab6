"""`conserve bench coserve`: the offline job's mix, token accounting inside the window, and a
short mixed run against the real server (offline requests cancelled when online ends)."""

from __future__ import annotations

import asyncio
import time

import httpx
from conftest import API_KEY

from conserve.bench.coserve import offline_job, offline_tokens, run_mixed, token_times
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
    on, off, window = asyncio.run(run_mixed(server, model, online, offline, API_KEY))
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
