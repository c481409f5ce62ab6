"""`conserve bench coserve`: the workloads (offline variants, closed-loop users), the order of
runs, token accounting inside the window, the ratios / ceiling / acceptance computed from
made-up records, the step-log summary, driving a real server, and one smoke invocation of the
whole command on the tiny model."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import tempfile

import numpy as np
import pytest
from conftest import API_KEY
from test_server import aborted_requests, wait_idle

from conserve.bench.coserve_drive import (
    NOT_SENT,
    ONLINE_LEAD_S,
    RunResult,
    run_mixed,
    token_times,
)
from conserve.bench.coserve_metrics import (
    HARVEST_MIN,
    RATIO_LIMIT,
    acceptance,
    comparisons,
    offline_tokens,
    percentiles,
    run_summary,
    tpot_s,
)
from conserve.bench.coserve_plan import (
    MIXED,
    OFFLINE_ALONE,
    ONLINE_ALONE,
    SLO_LABEL,
    PlannedRun,
    plan_runs,
)
from conserve.bench.coserve_report import render
from conserve.bench.coserve_steps import step_log_summary
from conserve.bench.coserve_workloads import (
    DECODE_HEAVY,
    PREFILL_HEAVY,
    TraceLoad,
    UserPlan,
    offline_job,
    offline_variant,
    users_load,
)
from conserve.bench.serve import BenchRequest, PromptMaker, RequestRecord, served_model

# -- workloads --------------------------------------------------------------------------------


def test_offline_job_mixes_three_kinds_with_shared_few_shot_prefixes(default_tokenizer):
    maker = PromptMaker(default_tokenizer, 0)
    job, desc = offline_job(30, maker, 0)
    assert desc["kinds"] == {"summary": 10, "generation": 10, "few-shot": 10}
    summaries, gens, shots = job[0::3], job[1::3], job[2::3]
    assert all(r.prompt_len >= 700 and r.output_len <= 24 for r in summaries)
    assert all(r.prompt_len <= 96 and r.output_len >= 128 for r in gens)
    assert all(r.output_len <= 4 for r in shots)
    prefixes = {tuple(r.prompt[:600]) for r in shots}
    assert 1 < len(prefixes) <= 4  # a few shared few-shot prefixes
    again, _ = offline_job(30, PromptMaker(default_tokenizer, 0), 0)
    assert [r.prompt for r in again] == [r.prompt for r in job]  # seeded


VARIANT_RANGES = [("prefill-heavy", PREFILL_HEAVY), ("decode-heavy", DECODE_HEAVY)]


@pytest.mark.parametrize(("name", "ranges"), VARIANT_RANGES)
def test_offline_variants_keep_their_lengths_and_are_seeded(default_tokenizer, name, ranges):
    (p_lo, p_hi), (o_lo, o_hi) = ranges
    job, desc = offline_variant(name, 60, PromptMaker(default_tokenizer, 5), 3)
    assert len(job) == 60 and desc["requests"] == 60 and desc["variant"] == name
    assert all(p_lo <= r.prompt_len <= p_hi and len(r.prompt) == r.prompt_len for r in job)
    assert all(o_lo <= r.output_len <= o_hi for r in job)
    assert len({r.prompt_len for r in job}) > 10  # spread over the range, not one length
    again, _ = offline_variant(name, 60, PromptMaker(default_tokenizer, 5), 3)
    assert [(r.prompt, r.output_len) for r in again] == [(r.prompt, r.output_len) for r in job]
    other, _ = offline_variant(name, 60, PromptMaker(default_tokenizer, 5), 4)
    assert [r.output_len for r in other] != [r.output_len for r in job]
    with pytest.raises(ValueError, match="unknown offline variant"):
        offline_variant("huge", 1, PromptMaker(default_tokenizer, 5), 3)


def test_closed_loop_users_share_the_rows_and_have_seeded_think_times(default_tokenizer):
    lens = [(10 + i, 2 + i) for i in range(7)]
    load = users_load(lens, 3, 2.0, PromptMaker(default_tokenizer, 1), seed=9, max_s=50.0)
    assert [[r.index for r in u.requests] for u in load.users] == [[0, 3, 6], [1, 4], [2, 5]]
    assert all(
        (r.prompt_len, r.output_len) == lens[r.index] for u in load.users for r in u.requests
    )
    assert [r.index for r in load.requests] == list(range(7)) and load.max_s == 50.0
    thinks = [u.think_s for u in load.users]
    assert all(len(t) == len(u.requests) for t, u in zip(thinks, load.users, strict=True))
    assert all(x > 0 for t in thinks for x in t) and thinks[0][:2] != thinks[1]
    again = users_load(lens, 3, 2.0, PromptMaker(default_tokenizer, 1), seed=9)
    assert [u.think_s for u in again.users] == thinks  # every run thinks the same
    assert [r.prompt for r in again.requests] == [r.prompt for r in load.requests]
    other = users_load(lens, 3, 2.0, PromptMaker(default_tokenizer, 1), seed=10)
    assert [u.think_s for u in other.users] != thinks


def test_stream_mode_is_one_user_sending_long_outputs_back_to_back(default_tokenizer, tmp_path):
    import argparse

    from conserve.bench.coserve import add_coserve_args, build_workloads, resolve_sizes

    trace = tmp_path / "trace.csv"
    rows = [f"2023-11-16 18:15:{10 + i:02d}.000000,{400 + 13 * i},{6 + i}" for i in range(9)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    p = argparse.ArgumentParser()
    add_coserve_args(p)
    args = p.parse_args(["--trace", str(trace), "--streams", "3", "--stream-output-len", "300",
                         "--offline-requests", "3"])  # fmt: skip
    resolve_sizes(args)
    work = build_workloads(args, default_tokenizer, ["stream"], ["decode-heavy"])
    [user] = work.online["stream"].users
    assert [r.output_len for r in user.requests] == [300, 300, 300]
    assert [r.prompt_len for r in user.requests] == [50, 52, 53]  # 400, 413, 426 x 0.125
    assert user.think_s == [0.0, 0.0, 0.0]  # back to back: never a step without online work
    assert work.online["stream"].max_s == args.users_max_s
    assert work.desc["online"]["stream"]["output_median"] == 300


def test_the_plan_rotates_policies_so_each_takes_each_place():
    plan = plan_runs(["trace", "users"], ["a", "b", "c"], ["fcfs", "priority", "conserve"])
    assert plan[0] == PlannedRun(ONLINE_ALONE, "trace", None, "conserve", ONLINE_ALONE)
    for variant in "abc":  # the offline-alone run comes before the variant's mixed runs
        first_mixed = next(
            i for i, p in enumerate(plan) if p.variant == variant and p.kind == MIXED
        )
        alone = [i for i, p in enumerate(plan) if p.kind == OFFLINE_ALONE and p.variant == variant]
        assert len(alone) == 1 and alone[0] < first_mixed
    for mode in ("trace", "users"):
        mixed = [p for p in plan if p.kind == MIXED and p.mode == mode]
        groups = [[p.policy for p in mixed if p.variant == v] for v in "abc"]
        assert all(sorted(g) == ["conserve", "fcfs", "priority"] for g in groups)
        for place in range(3):  # every policy once in every place
            assert sorted(g[place] for g in groups) == ["conserve", "fcfs", "priority"]
    assert len(plan) == 2 * 4 + 3 + 2 * 3 * 3  # online alone before and after each variant
    for mode in ("trace", "users"):
        alone = [i for i, p in enumerate(plan) if p.kind == ONLINE_ALONE and p.mode == mode]
        assert len(alone) == 4
        for v, (lo, hi) in zip("abc", zip(alone, alone[1:], strict=False), strict=True):
            mixed = [i for i, p in enumerate(plan) if (p.mode, p.variant) == (mode, v)]
            assert lo < min(mixed) and max(mixed) < hi  # the variant's runs between two
        assert [plan[i].id[-2:] for i in alone[1:]] == ["#2", "#3", "#4"]
    slo = plan_runs(["users"], ["a"], ["conserve"], slo_from_alone=True, vllm=True)
    assert [(p.label, p.engine) for p in slo] == [
        (ONLINE_ALONE, "conserve"),
        (OFFLINE_ALONE, "conserve"),
        ("conserve", "conserve"),
        (SLO_LABEL, "conserve"),
        (ONLINE_ALONE, "conserve"),
        ("vllm alone", "vllm"),
        ("vllm priority", "vllm"),
    ]
    assert [p.slo_from_alone for p in slo] == [False, False, False, True, False, False, False]


# -- accounting -------------------------------------------------------------------------------


def test_offline_tokens_count_only_what_arrived_inside_the_window():
    rec = RequestRecord(0, 100, 10, 0.0, sent_s=1.0, ttft_s=2.0, itl_s=[1.0, 1.0, 1.0])
    assert token_times(rec) == [3.0, 4.0, 5.0, 6.0]
    # a window that starts late (the online lead): the prompt counted only if the first token
    # came inside it
    assert offline_tokens(rec, 10.0, start=3.5) == 3
    assert offline_tokens(rec, 10.0, start=2.5) == 104
    assert offline_tokens(rec, 4.5) == 100 + 2
    assert offline_tokens(rec, 2.5) == 0  # not started inside the window: no prompt credit
    assert offline_tokens(RequestRecord(1, 50, 5, 0.0), 10.0) == 0


def test_tpot_is_the_span_of_the_tokens_over_tokens_minus_one():
    rec = RequestRecord(0, 10, 4, 0.0, ok=True, ttft_s=0.5, e2e_s=9.0, itl_s=[0.1, 0.2, 0.3])
    rec.output_tokens = 4
    assert tpot_s(rec) == pytest.approx(0.6 / 3)  # not (e2e - ttft) / 3: the stream's tail
    rec.output_tokens = 1
    assert tpot_s(rec) is None


def _rec(i: int, ttft: float, tpot: float, n: int = 5, sent: float = 0.0) -> RequestRecord:
    rec = RequestRecord(i, 20, n, 0.0, sent_s=sent, ok=True, ttft_s=ttft, output_tokens=n)
    rec.e2e_s, rec.itl_s = ttft + tpot * (n - 1), [tpot] * (n - 1)
    return rec


def _online(scale_ttft: float, scale_tpot: float, n: int = 10) -> list[RequestRecord]:
    """n requests whose TTFT and TPOT are those of the alone run times the scales."""
    return [_rec(i, 0.1 * (1 + i) * scale_ttft, 0.02 * (1 + i % 3) * scale_tpot) for i in range(n)]


def _batch(tok: int) -> dict:
    return {
        "prompt_tokens": tok - tok // 5,
        "output_tokens": tok // 5,
        "lines": 5,
        "total_lines": 99,
    }


def _made_up(conserve: tuple[float, float], conserve_tok: int, priority_tpot: float) -> list[dict]:
    """An invocation of one mode and one variant, from records: alone busy 25% of 10 s, the
    offline job alone at 1000 tok/s (so a ceiling of 750), fcfs at 2x alone, priority at 1.5x
    TTFT and `priority_tpot` x TPOT, conserve at the given scales and tokens in 10 s."""
    runs = [
        (PlannedRun(ONLINE_ALONE, "trace", None, "conserve", ONLINE_ALONE),
         RunResult(_online(1, 1), [], 10.0, {"busy_s": 2.5})),
        (PlannedRun(OFFLINE_ALONE, None, "mixed", "fcfs", OFFLINE_ALONE),
         RunResult([], [], 10.0, {"busy_s": 10.0}, batch=_batch(10_000))),
        (PlannedRun(MIXED, "trace", "mixed", "fcfs", "fcfs"),
         RunResult(_online(2, 2), [], 10.0, batch=_batch(9000))),
        (PlannedRun(MIXED, "trace", "mixed", "priority", "priority"),
         RunResult(_online(1.5, priority_tpot), [], 10.0, batch=_batch(8000))),
        (PlannedRun(MIXED, "trace", "mixed", "conserve", "conserve"),
         RunResult(_online(*conserve), [], 10.0, {"preemptions_stop": 3.0},
                   batch=_batch(conserve_tok))),
    ]  # fmt: skip
    return [run_summary(p, r, i) for i, (p, r) in enumerate(runs, 1)]


def test_ratios_ceiling_and_acceptance_from_made_up_records_pass():
    runs = _made_up(conserve=(1.1, 1.05), conserve_tok=7000, priority_tpot=1.5)
    [c] = comparisons(runs, ["fcfs", "priority", "conserve"])
    assert (c["mode"], c["variant"]) == ("trace", "mixed")
    assert c["busy_share"] == pytest.approx(0.25)
    assert c["offline_alone_tok_s"] == pytest.approx(1000.0)
    assert c["ceiling_tok_s"] == pytest.approx(750.0)
    assert [r["label"] for r in c["rows"]] == ["fcfs", "priority", "conserve"]
    fcfs, prio, cons = c["rows"]
    for q in ("p50", "p90", "p99"):  # every latency scaled alike: the ratio is the scale
        assert fcfs["ratios"]["ttft"][q] == pytest.approx(2.0)
        assert cons["ratios"]["ttft"][q] == pytest.approx(1.1)
        assert cons["ratios"]["tpot"][q] == pytest.approx(1.05)
    assert cons["ttft_ms"]["p50"] == pytest.approx(
        np.percentile([110 * (1 + i) for i in range(10)], 50)
    )
    assert cons["share_of_ceiling"] == pytest.approx(700 / 750)
    assert cons["preemptions"] == {"stop": 3.0}
    acc = acceptance([c])
    assert acc["passed"] is True and acc["ratio_limit"] == RATIO_LIMIT
    checks = acc["workloads"][0]["checks"]
    assert [ch["passed"] for ch in checks] == [True, True, True]
    assert "1.10x" in checks[0]["detail"] and "93%" in checks[2]["detail"]
    text = render(_data(runs, [c], acc), [])
    assert "Overall: **PASS**" in text and "| conserve | 605 (1.10x) |" in text


def test_acceptance_fails_on_latency_on_a_better_baseline_and_on_harvest():
    # TTFT 1.3x alone; priority's TPOT alone-like (1.0x) beats conserve's 1.05x; 600 tok/s
    runs = _made_up(conserve=(1.3, 1.05), conserve_tok=6000, priority_tpot=1.0)
    comps = comparisons(runs, ["fcfs", "priority", "conserve"])
    acc = acceptance(comps)
    checks = acc["workloads"][0]["checks"]
    assert acc["passed"] is False and [ch["passed"] for ch in checks] == [False, False, False]
    assert "TTFT p99 1.30x" in checks[0]["detail"]
    assert "TPOT p50 vs priority: 1.05x > 1.00x" in checks[1]["detail"]
    assert "TTFT" not in checks[1]["detail"]  # 1.3x TTFT is still better than priority's 1.5x
    assert "80%" in checks[2]["detail"] and HARVEST_MIN > 0.8
    assert "Overall: **FAIL**" in render(_data(runs, comps, acc), [])
    # without fcfs and priority runs the comparison cannot be made: not run, which is no pass
    alone_only = [r for r in runs if r["label"] not in ("fcfs", "priority")]
    acc = acceptance(comparisons(alone_only, ["conserve"]))
    assert acc["workloads"][0]["checks"][1]["passed"] is None and acc["passed"] is False


def test_the_ceiling_takes_the_offline_job_alone_over_the_online_windows_length():
    """A job that slows as it runs (a decode-heavy job's contexts grow): its speed alone is
    taken over as many seconds as the online load alone lasted, not over its whole window."""
    lead = 5.0

    def rec(i: int, first: float, gap: float, n: int) -> RequestRecord:
        # prompt of 10 tokens, then n output tokens `gap` apart from `first` (run seconds)
        return RequestRecord(i, 10, n, 0.0, sent_s=first - 0.1, ttft_s=0.1, itl_s=[gap] * (n - 1))

    # 10 tokens/s of output in the first 10 s of the window, 5 tokens/s in the next 20
    fast = rec(0, lead + 0.05, 0.1, 100)  # tokens at 5.05 .. 14.95
    slow = rec(1, lead + 10.1, 0.2, 100)  # tokens at 15.1 .. 34.9
    runs = [
        run_summary(PlannedRun(ONLINE_ALONE, "users", None, "conserve", ONLINE_ALONE),
                    RunResult(_online(1, 1), [], 10.0, {"busy_s": 2.5}), 1),
        run_summary(PlannedRun(OFFLINE_ALONE, None, "mixed", "fcfs", OFFLINE_ALONE),
                    RunResult([], [fast, slow], lead + 30.0, {"busy_s": 35.0}, lead_s=lead), 2),
        run_summary(PlannedRun(MIXED, "users", "mixed", "conserve", "conserve"),
                    RunResult(_online(1, 1), [], 10.0, batch=_batch(5000)), 3),
    ]  # fmt: skip
    off = runs[1]["offline"]
    assert off["tokens_every_s"][:3] == [60, 110, 145]  # cumulative at 5, 10, 15 s of the window
    assert off["tok_s"] == pytest.approx(220 / 30)  # the whole window: both prompts, 200 tokens
    [c] = comparisons(runs, ["conserve"])
    # the online load alone lasted 10 s: the job's first 10 s alone (a prompt, 100 tokens)
    assert c["offline_alone_over_s"] == pytest.approx(10.0)
    assert c["offline_alone_tok_s"] == pytest.approx(11.0)
    assert c["ceiling_tok_s"] == pytest.approx(0.75 * 11.0)
    # an online window longer than the job's alone window: its whole window
    runs[0]["window_s"] = 60.0
    [c] = comparisons(runs, ["conserve"])
    assert c["offline_alone_tok_s"] == pytest.approx(220 / 30)
    assert c["offline_alone_over_s"] == pytest.approx(30.0)


def test_ratios_compare_the_same_requests_when_users_left_some_unsent():
    alone = _online(1, 1)
    slow = _online(2, 2)
    for rec in slow[7:]:  # the users' time limit passed before these were sent
        rec.ok, rec.error, rec.ttft_s, rec.itl_s = False, NOT_SENT, None, []
    runs = [
        run_summary(PlannedRun(ONLINE_ALONE, "users", None, "conserve", ONLINE_ALONE),
                    RunResult(alone, [], 10.0, {"busy_s": 1.0}), 1),
        run_summary(PlannedRun(MIXED, "users", "mixed", "priority", "priority"),
                    RunResult(slow, [], 10.0), 2),
    ]  # fmt: skip
    [c] = comparisons(runs, ["priority"])
    row = c["rows"][0]
    assert row["online_not_sent"] == 3 and row["ratios"]["common_requests"] == 7
    # over the 7 requests answered in both runs, not against all 10 alone
    assert row["ratios"]["ttft"]["p99"] == pytest.approx(2.0)
    assert c["ceiling_tok_s"] is None  # no offline-alone run: no ceiling


def _data(runs: list[dict], comps: list[dict], acc: dict) -> dict:
    return {
        "info": {"command": "conserve bench coserve"},
        "load": {"online": {}, "offline": {}, "settings": {}},
        "runs": runs,
        "comparisons": comps,
        "acceptance": acc,
    }


def test_step_log_summary_explains_an_online_wait(tmp_path):
    """A hand-written step log: an online request reaches the engine while an offline step
    runs, that step is stopped, its own prefill runs next. The summary gives the engine's part
    of its TTFT, the offline time it waited behind, and the compute the stop threw away."""
    recs = [
        {"t": 10.0, "added": "off", "class": "offline", "prompt_len": 800},
        {"t": 10.0, "plan_s": 0.001, "run_s": 0.5, "apply_s": 0.002, "predicted_s": 0.4,
         "online": [0, 0], "offline": [1, 512], "online_prefill_ids": [],
         "stopped_at_layer": None},
        # reached the engine's process at 10.55; the loop took it in at 10.66
        {"t": 10.66, "added": "on", "class": "online", "prompt_len": 40, "arrived": 10.55},
        {"t": 10.51, "plan_s": 0.001, "run_s": 0.15, "apply_s": 0.0, "predicted_s": 0.4,
         "online": [0, 0], "offline": [1, 288], "online_prefill_ids": [],
         "stopped_at_layer": 9, "stop_wait_s": 0.02},
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
    assert abs(s["engine_ttft_ms"]["max"] - 210.0) < 1e-6  # 10.55 -> 10.76
    assert abs(s["offline_blocking_ms"]["max"] - 110.0) < 1e-6  # 10.55 -> 10.66 behind offline
    assert abs(s["stop_wait_ms"]["median"] - 20.0) < 1e-6
    assert s["busy_s"] == {"online only": 0.05, "mixed": 0.0, "offline only": 0.5}
    # the median of |0.4 - 0.5| / 0.5 and |0.05 - 0.05| / 0.05
    assert abs(s["prediction_error_median"] - 0.1) < 1e-9


# -- against servers --------------------------------------------------------------------------


def test_an_offline_alone_window_starts_after_the_same_lead_as_a_mixed_one(
    server, default_tokenizer
):
    """The offline job's start-up (its first prompts) is outside the measured window in the
    offline-alone run as in the mixed runs, so the ceiling is not credited with it."""
    maker = PromptMaker(default_tokenizer, 3)
    model = served_model(server, API_KEY)
    offline = [BenchRequest(i, 0.0, maker.ids(30), 30, 400) for i in range(2)]
    w = asyncio.run(run_mixed(server, model, None, offline, API_KEY, window_s=0.5))
    assert w.lead_s == ONLINE_LEAD_S and w.window_s >= ONLINE_LEAD_S + 0.5
    assert all(r.ttft_s is not None and r.sent_s + r.ttft_s < w.lead_s for r in w.offline)


def test_mixed_run_against_the_server_cancels_offline_work_at_the_end(server, default_tokenizer):
    maker = PromptMaker(default_tokenizer, 1)
    model = served_model(server, API_KEY)
    online = TraceLoad([BenchRequest(i, 0.3 * i, maker.ids(40), 40, 8) for i in range(2)])
    # the online load starts ONLINE_LEAD_S (5 s) into the offline job: 1900 tokens each keep
    # these three running past the window at any step time above 3 ms (400 did not, at 11 ms)
    offline = [BenchRequest(i, 0.0, maker.ids(30), 30, 1900) for i in range(3)]
    wait_idle(server)  # nothing of earlier tests left to abort: the counts below are exact
    before = aborted_requests(server)
    w = asyncio.run(run_mixed(server, model, online, offline, API_KEY))
    assert all(r.ok and r.output_tokens == 8 for r in w.online)
    assert w.window_s >= max(r.sent_s + r.e2e_s for r in w.online) - 1e-6
    # cut off at the window's end, not finished
    assert all(not r.ok for r in w.offline)
    state = wait_idle(server)
    assert state["kv_tables"] == 0 and state["integrity_error"] is None
    # the engine aborted the three offline requests the bench cancelled, and nothing online
    after = aborted_requests(server)
    assert after["offline"] - before["offline"] == 3, (before, after)
    assert after["online"] == before["online"]


def test_closed_loop_users_wait_for_each_answer_and_think(server, default_tokenizer):
    model = served_model(server, API_KEY)
    maker = PromptMaker(default_tokenizer, 2)
    load = users_load([(30, 6)] * 5, 2, 0.2, maker, seed=1, think_from="answer")
    w = asyncio.run(run_mixed(server, model, load, [], API_KEY))
    assert [r.index for r in w.online] == list(range(5)) and all(r.ok for r in w.online)
    for plan in load.users:
        recs = [w.online[r.index] for r in plan.requests]
        # the first after its think time; each next one after the answer plus its think time
        assert recs[0].sent_s >= plan.think_s[0] - 1e-3
        for prev, nxt, think in zip(recs, recs[1:], plan.think_s[1:], strict=False):
            assert nxt.sent_s >= prev.sent_s + prev.e2e_s + think - 1e-3
    # a time limit already passed: nothing is sent, every request says why
    late = users_load([(30, 6)] * 2, 2, 0.01, maker, 1, max_s=0.0, think_from="answer")
    w = asyncio.run(run_mixed(server, model, late, [], API_KEY))
    assert all(r.error == NOT_SENT and r.sent_s == 0.0 for r in w.online)


def test_paced_users_send_on_their_schedule_with_one_request_in_flight(server, default_tokenizer):
    """Paced users (the default): request k goes out at the sum of the user's think times up to
    k, unless the answer to k - 1 comes later, and then right after that answer."""
    model = served_model(server, API_KEY)
    load = users_load([(30, 6)] * 8, 2, 0.3, PromptMaker(default_tokenizer, 3), seed=4)
    assert load.think_from == "send"
    # one user whose think times are shorter than any answer: it sends each request as soon
    # as the previous answer is in, never two at once
    rushed = UserPlan(load.users[1].requests, [0.0] * len(load.users[1].requests))
    load = dataclasses.replace(load, users=[load.users[0], rushed])
    w = asyncio.run(run_mixed(server, model, load, [], API_KEY))
    assert all(r.ok for r in w.online)
    on_time = 0
    for plan in load.users:
        recs = [w.online[r.index] for r in plan.requests]
        due = list(itertools.accumulate(plan.think_s))
        for k, rec in enumerate(recs):
            assert rec.sent_s >= due[k] - 1e-3  # never before it is due
            if k:
                prev = recs[k - 1]
                assert rec.sent_s >= prev.sent_s + prev.e2e_s - 1e-3  # one in flight
                # sent when due, or right after the previous answer: no think time added
                assert rec.sent_s <= max(due[k], prev.sent_s + prev.e2e_s) + 0.1
                on_time += due[k] > prev.sent_s + prev.e2e_s
    # the paced user's think times (mean 0.3 s) mostly outlast its answers
    assert on_time >= 1
    with pytest.raises(ValueError, match="think_from"):
        users_load([(30, 6)], 1, 0.3, PromptMaker(default_tokenizer, 3), 4, think_from="reply")


def test_smoke_invocation_reports_every_section(
    tmp_path, tiny_llama_dir, linear_profile, monkeypatch
):
    """Both online modes, one offline variant, fcfs and conserve, tiny sizes, on fresh
    servers of the tiny model: the JSON has every section, ratios and ceiling follow from the
    runs it holds, and the acceptance summary is there."""
    from conserve.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # step logs and server logs
    trace = tmp_path / "trace.csv"  # the trace's format, so the test needs no shared files
    rows = [f"2023-11-16 18:15:{10 + i:02d}.000000,{40 + 13 * i},{6 + i % 5}" for i in range(20)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    out = tmp_path / "results"
    argv = ["bench", "coserve", "--model", str(tiny_llama_dir), "--dtype", "float32",
            "--online-modes", "trace,users", "--offline-variants", "decode-heavy",
            "--trace", str(trace),
            "--policies", "fcfs,conserve", "--online-requests", "5", "--online-rate", "4",
            "--users", "2", "--requests-per-user", "3", "--think-s", "0.1",
            "--offline-requests", "400", "--offline-alone-s", "2", "--skip-vllm",
            "--conserve-args", f"--latency-profile {linear_profile}",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    [path] = out.glob("coserve-*.json")
    data = json.loads(path.read_text())
    assert set(data) >= {"info", "load", "constants", "runs", "comparisons", "acceptance"}
    assert data["failed_runs"] == [] and len(data["plots"]) == 3
    assert all((out / p).is_file() for p in data["plots"])
    assert set(data["load"]["online"]) == {"trace", "users"}
    runs = {r["id"]: r for r in data["runs"]}
    assert [r["order"] for r in data["runs"]] == list(range(1, 10))
    alone_ids = [f"{m}/-/online alone{n}" for m in ("trace", "users") for n in ("", " #2")]
    assert sorted(runs) == sorted(
        [*alone_ids, "-/decode-heavy/offline alone"]
        + [f"{m}/decode-heavy/{p}" for m in ("trace", "users") for p in ("fcfs", "conserve")]
    )
    for r in runs.values():
        assert r["online"]["completed"] == r["online"]["requests"]
    _check_ratio_by_hand(data, runs)
    for c in data["comparisons"]:  # the ceiling: online alone (twice) and offline alone
        alones = [runs[f"{c['mode']}/-/online alone{n}"] for n in ("", " #2")]
        off = runs["-/decode-heavy/offline alone"]
        b = np.mean([a["engine"]["busy_s"] / a["window_s"] for a in alones])
        assert 0 < b < 1 and c["busy_share"] == pytest.approx(b)
        assert c["ceiling_tok_s"] == pytest.approx((1 - b) * off["offline"]["tok_s"])
        assert off["offline"]["tok_s"] > 0
    acc = data["acceptance"]
    assert [(w["mode"], len(w["checks"])) for w in acc["workloads"]] == [("trace", 3), ("users", 3)]
    assert all(ch["passed"] in (True, False) for w in acc["workloads"] for ch in w["checks"])
    assert runs["users/decode-heavy/conserve"]["steps"]["steps"] > 0
    md = path.with_suffix(".md").read_text()
    assert "## Acceptance" in md and ("**PASS**" in md or "**FAIL**" in md)


def _check_ratio_by_hand(data: dict, runs: dict) -> None:
    """P90 TTFT of the users-mode conserve run over the alone runs' (both runs' TTFTs pooled),
    from the per-request records in the JSON, equals the reported ratio."""
    [c] = [c for c in data["comparisons"] if c["mode"] == "users"]
    row = next(r for r in c["rows"] if r["label"] == "conserve")
    mine = {
        x["index"]: x["ttft_ms"] for x in runs["users/decode-heavy/conserve"]["online_requests"]
    }
    first, again = (
        {x["index"]: x["ttft_ms"] for x in runs[f"users/-/online alone{n}"]["online_requests"]}
        for n in ("", " #2")
    )
    assert sorted(mine) == sorted(first) == sorted(again) == list(range(6))
    pooled = list(first.values()) + list(again.values())
    by_hand = np.percentile(list(mine.values()), 90) / np.percentile(pooled, 90)
    assert row["ratios"]["ttft"]["p90"] == pytest.approx(by_hand)


def test_mixed_runs_are_compared_with_the_alone_runs_next_to_them():
    from conserve.bench.coserve_metrics import bracket

    alones = [{"order": o} for o in (1, 6, 11, 16)]
    assert [a["order"] for a in bracket(alones, [7, 8, 9])] == [6, 11]
    assert [a["order"] for a in bracket(alones, [17])] == [16]  # none after
    assert [a["order"] for a in bracket(alones, [0])] == [1]  # none before
    assert bracket([], [3]) == []


def _alone_run(rid: str, ttfts: list[float], tpots: list[float], busy: float = 0.4) -> dict:
    rows = [
        {"index": i, "ttft_ms": t, "tpot_ms": p}
        for i, (t, p) in enumerate(zip(ttfts, tpots, strict=True))
    ]
    return {
        "id": rid,
        "window_s": 100.0,
        "busy_share": busy,
        "online_requests": rows,
        "online": {"ttft_ms": percentiles(ttfts), "tpot_ms": percentiles(tpots)},
    }


def test_the_two_online_alone_runs_are_pooled_and_their_drift_reported():
    from conserve.bench.coserve_metrics import merge_alone

    first = _alone_run("a", [100.0, 200.0, 300.0], [50.0, 60.0, 70.0], 0.4)
    later = _alone_run("b", [120.0, 240.0, 360.0], [50.0, 60.0, 70.0], 0.5)
    m = merge_alone([first, later])
    assert sorted(x["ttft_ms"] for x in m["online_requests"]) == [
        100.0, 120.0, 200.0, 240.0, 300.0, 360.0
    ]  # fmt: skip
    assert m["busy_share"] == pytest.approx(0.45)
    assert m["drift"]["ttft"] == pytest.approx(1.2) and m["drift"]["tpot"] == pytest.approx(1.0)
    assert m["online"]["ttft_ms"]["p50"] == pytest.approx(220.0)
    assert merge_alone([first]) is first and merge_alone([]) is None


def test_a_run_like_the_alone_runs_is_not_slower_than_them_at_the_tail():
    """Each alone run has its own two slow requests (another request shared their steps): a
    third run like them, compared with the two pooled, is 1.0x at P99; with each request's
    latency averaged over the two alone runs, it would have looked 1.6x slower."""
    from conserve.bench.coserve_metrics import latency_ratios, merge_alone

    def tpots(slow: set[int]) -> list[float]:
        return [50.0 if i in slow else 10.0 for i in range(100)]

    ttfts = [100.0] * 100
    a = _alone_run("a", ttfts, tpots({0, 1}))
    b = _alone_run("b", ttfts, tpots({2, 3}))
    mixed = _alone_run("mixed", ttfts, tpots({4, 5}))
    ratios = latency_ratios(mixed, merge_alone([a, b]))
    assert ratios["tpot"]["p99"] == pytest.approx(1.0)
    assert ratios["tpot"]["p50"] == pytest.approx(1.0)
    assert ratios["common_requests"] == 100
    averaged = [(x + y) / 2 for x, y in zip(tpots({0, 1}), tpots({2, 3}), strict=True)]
    assert percentiles(tpots({4, 5}))["p99"] / percentiles(averaged)["p99"] > 1.5
