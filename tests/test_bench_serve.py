"""`conserve bench serve`: metric arithmetic, arrival processes, trace scaling, prompt cutting,
and one short run against the real server."""

from __future__ import annotations

import asyncio
import math
import statistics

import pytest
from conftest import API_KEY

from conserve.bench.serve import (
    SLO,
    BenchRequest,
    PromptMaker,
    RequestRecord,
    TraceRow,
    TraceScaling,
    build_requests,
    dist_ms,
    gamma_arrivals,
    load_trace,
    render_markdown,
    request_body,
    run_load,
    scale_trace,
    served_model,
    summarize,
    trace_path,
)


def _rec(i, ttft, e2e, out, itl=(), ok=True, prompt=10) -> RequestRecord:
    return RequestRecord(
        i, prompt, out, 0.0, ok=ok, ttft_s=ttft, e2e_s=e2e, itl_s=list(itl), output_tokens=out
    )


# -- metrics ----------------------------------------------------------------------------------


def test_percentiles_interpolate_between_order_statistics():
    d = dist_ms([0.001 * x for x in range(1, 101)])  # 1..100 ms
    assert d["mean"] == pytest.approx(50.5)
    assert d["median"] == pytest.approx(50.5)
    assert d["p90"] == pytest.approx(90.1)
    assert d["p99"] == pytest.approx(99.01)
    assert math.isnan(dist_ms([])["p99"])


def test_tpot_excludes_the_first_token():
    r = _rec(0, ttft=0.5, e2e=2.5, out=11)
    assert r.tpot_s == pytest.approx(0.2)  # (2.5 - 0.5) / 10
    assert _rec(1, ttft=0.5, e2e=0.5, out=1).tpot_s is None  # one token: no TPOT
    assert _rec(2, ttft=None, e2e=None, out=0, ok=False).tpot_s is None


def test_summary_throughput_and_goodput():
    recs = [
        _rec(0, 0.1, 1.1, 11, itl=[0.1] * 10),  # TPOT 100 ms
        _rec(1, 0.3, 2.3, 11, itl=[0.2] * 10),  # TPOT 200 ms
        _rec(2, 0.8, 1.8, 11, itl=[0.1] * 10),  # TTFT too slow for the SLO
        _rec(3, None, None, 0, ok=False),
    ]
    recs[3].error = "HTTP 500: boom"
    s = summarize(recs, duration_s=4.0, slo=SLO.parse(["ttft:500", "tpot:150"]))
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["request_throughput"] == pytest.approx(0.75)
    assert s["output_throughput"] == pytest.approx(33 / 4)
    assert s["total_token_throughput"] == pytest.approx((33 + 30) / 4)
    assert s["goodput"] == pytest.approx(1 / 4)  # only request 0 meets both
    assert s["slo_attainment"] == pytest.approx(1 / 4)
    assert s["ttft_ms"]["median"] == pytest.approx(300)
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 200 + 100) / 3)
    assert s["itl_ms"]["mean"] == pytest.approx((1 + 2 + 1) / 30 * 1e3)
    assert s["e2e_ms"]["p99"] == pytest.approx(1800 + 0.98 * 500)
    assert s["errors"] == ["HTTP 500: boom"]
    # no SLO: no goodput; an e2e SLO alone
    assert "goodput" not in summarize(recs, 4.0, None)
    assert summarize(recs, 4.0, SLO(e2e_ms=2000))["goodput"] == pytest.approx(2 / 4)


def test_slo_parse_rejects_unknown_keys():
    assert SLO.parse(["ttft:200"]) == SLO(ttft_ms=200)
    assert SLO.parse(None) is None
    with pytest.raises(ValueError):
        SLO.parse(["latency:5"])


# -- arrivals ---------------------------------------------------------------------------------


def test_arrivals_are_seeded_and_have_the_mean_rate():
    a = gamma_arrivals(20_000, rate=4.0, seed=7)
    assert a == gamma_arrivals(20_000, rate=4.0, seed=7)
    assert a != gamma_arrivals(20_000, rate=4.0, seed=8)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:], strict=False))
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("shape", [0.25, 4.0])
def test_gamma_arrivals_have_the_cv_of_their_shape(shape):
    a = gamma_arrivals(40_000, rate=2.0, shape=shape, seed=1)
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.05)
    cv = statistics.stdev(gaps) / statistics.mean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(shape), rel=0.06)


def test_infinite_rate_sends_everything_at_once():
    assert gamma_arrivals(5, math.inf) == [0.0] * 5


# -- traces -----------------------------------------------------------------------------------


def test_trace_loading_and_scaling(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:48.6805900,3000,2\n"
        "2023-11-16 18:15:50.6805900,10,900\n"
        "2023-11-16 18:15:56.6805900,100,100\n"
    )
    rows = load_trace(csv)
    assert [r.time_s for r in rows] == pytest.approx([0, 2, 4, 10])
    assert rows[0] == TraceRow(0.0, 374, 44)

    times, lens, speedup = scale_trace(
        rows, 3, TraceScaling(speedup=2.0, length_scale=0.5, max_prompt_len=1000)
    )
    assert speedup == 2.0 and times == pytest.approx([0, 1, 2])
    assert lens == [(187, 22), (1000, 1), (5, 450)]  # scaled, clipped, at least 1 output token

    # a target rate: 3 gaps over 10 s is 0.3 req/s, so 0.6 req/s is a 2x speed-up
    times, _, speedup = scale_trace(rows, 4, TraceScaling(rate=0.6, max_output_len=50))
    assert speedup == pytest.approx(2.0) and times[-1] == pytest.approx(5.0)
    # start later in the trace; clip outputs
    times, lens, _ = scale_trace(rows, 10, TraceScaling(start_s=3, max_output_len=50))
    assert times == pytest.approx([0, 6]) and lens == [(10, 50), (100, 50)]


def test_the_shared_traces_load_when_present():
    path = trace_path("conv")
    if not path.is_file():
        pytest.skip(f"{path} not present")
    rows = load_trace(path)
    assert len(rows) > 19_000
    rate = (len(rows) - 1) / rows[-1].time_s
    assert 4 < rate < 7  # the README measured 5.5 req/s


# -- prompts ----------------------------------------------------------------------------------


def test_prompts_have_exact_token_lengths_and_are_seeded(default_tokenizer):
    lens = [(n, 8) for n in (1, 7, 64, 256, 1000)]
    a = build_requests([0.0] * 5, lens, PromptMaker(default_tokenizer, seed=3), ids=False)
    b = build_requests([0.0] * 5, lens, PromptMaker(default_tokenizer, seed=3), ids=False)
    c = build_requests([0.0] * 5, lens, PromptMaker(default_tokenizer, seed=4), ids=False)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    for r, (n, _) in zip(a, lens, strict=True):
        assert len(default_tokenizer.encode(r.prompt)) == n
    ids = build_requests([0.0] * 5, lens, PromptMaker(default_tokenizer, seed=3), ids=True)
    assert [len(r.prompt) for r in ids] == [n for n, _ in lens]
    # distinct starts: no two prompts share their first tokens
    starts = {tuple(r.prompt[:16]) for r in ids[2:]}
    assert len(starts) == 3


def test_request_bodies_fix_the_output_length():
    r = BenchRequest(0, 0.0, "hello", 1, 32)
    body = request_body(r, "m", "completions")
    assert body["prompt"] == "hello" and body["max_tokens"] == 32
    assert body["ignore_eos"] is True and body["min_tokens"] == 32 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    chat = request_body(r, "m", "chat")
    assert chat["messages"] == [{"role": "user", "content": "hello"}] and "prompt" not in chat


# -- a real run -------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_run_against_the_real_server(server, default_tokenizer):
    model = served_model(server, API_KEY)
    times = gamma_arrivals(6, rate=4.0, seed=0)
    reqs = build_requests(times, [(48, 16)] * 6, PromptMaker(default_tokenizer), ids=False)
    records, duration = asyncio.run(run_load(server, model, reqs, "completions", API_KEY))
    assert all(r.ok for r in records), [r.error for r in records]
    for r in records:
        assert r.output_tokens == 16
        assert r.server_prompt_tokens == 48  # the prompt text is exactly 48 tokens
        assert 0 < r.ttft_s <= r.e2e_s < duration
        assert len(r.itl_s) == r.chunks - 1 and r.chunks >= 2
        assert 0 < r.tpot_s < r.e2e_s
        assert r.sent_s >= r.scheduled_s
    s = summarize(records, duration, SLO(ttft_ms=60_000))
    assert s["completed"] == 6 and s["failed"] == 0 and s["output_len_mismatches"] == 0
    assert s["prompt_len_mismatches"] == 0
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    md = render_markdown(_results(model, s))
    assert "| a | 6 | 0 |" in md and "conserve / vllm-cpu" in md and "| TTFT median |" in md

    # the chat endpoint: the role-only first chunk is not a token
    chat = build_requests([0.0, 0.1], [(20, 8)] * 2, PromptMaker(default_tokenizer), ids=False)
    records, _ = asyncio.run(run_load(server, model, chat, "chat", API_KEY))
    assert all(r.ok and r.output_tokens == 8 and r.chunks <= 8 for r in records), records
    assert all(r.server_prompt_tokens > 20 for r in records)  # the chat template's tokens too


def _results(model: str, s: dict) -> dict:
    m = {"date": "d", "cpu": "c", "cores": 2, "python": "p", "torch": "t", "command": "x"}
    load = {
        "endpoint": "completions",
        "seed": 0,
        "arrivals": "Poisson",
        "lengths": "48/16",
        "requests": 6,
        "offered_rate": 4.0,
        "prompt_len": {"mean": 48.0, "max": 48},
        "output_len": {"mean": 16.0, "max": 16},
        "prompt_format": "text",
    }
    row = {"load_before": (1, 1, 1), "load_after": (1, 1, 1), "metrics": s}
    return {
        "machine": m,
        "model": model,
        "dtype": "float32",
        "load": load,
        "slo": {"ttft_ms": 60_000, "tpot_ms": None, "e2e_ms": None},
        "servers": [
            row | {"name": "a", "engine": "conserve"},
            row | {"name": "b", "engine": "vllm-cpu"},
        ],
        "notes": [],
    }


@pytest.mark.parametrize("bench", ["serve", "coserve"])
def test_a_missing_bench_extra_stops_the_benchmark_with_how_to_install_it(
    bench, monkeypatch, capsys
):
    import importlib.util

    from conserve.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "httpx" else real(name, *a)
    )
    argv = ["bench", bench] + (["--server", "http://127.0.0.1:9"] if bench == "serve" else [])
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert "httpx" in str(e.value) and "conserve-llm[bench]" in str(e.value)
