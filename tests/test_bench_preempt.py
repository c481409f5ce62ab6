"""`conserve bench preempt` end to end at toy size (tiny random-weight model, a linear latency
profile): the results files exist and hold what the docs promise; no timing is asserted."""

from __future__ import annotations

import json
import time

import conserve.bench.preempt as preempt
from conserve.cli import main

LAYER_SLEEP_S = 0.25


def slow_prefill_layers(build):
    """`build_engine`, whose engines sleep LAYER_SLEEP_S in every layer of a step of 256 rows
    or more (the offline prefill): the step's layers then take about equal, known times on a
    busy machine too, so an arrival in the middle of the step (seeds chosen so) comes before
    the last safepoint, where policy conserve stops it."""

    def built(args, safepoint_every):
        engine = build(args, safepoint_every)
        for layer in engine.runner.model.layers:

            def project(h, *a, _fwd=layer.project, **k):
                if h.shape[0] >= 256:
                    time.sleep(LAYER_SLEEP_S)
                return _fwd(h, *a, **k)

            layer.project = project
        return engine

    return built


def test_bench_preempt_writes_waits_per_setting_and_overhead(
    tiny_llama_dir, linear_profile, tmp_path, monkeypatch
):
    monkeypatch.setattr(preempt, "build_engine", slow_prefill_layers(preempt.build_engine))
    out = tmp_path / "results"
    rc = main(
        [
            "bench",
            "preempt",
            "--model",
            str(tiny_llama_dir),
            "--dtype",
            "float32",
            "--latency-profile",
            linear_profile,
            "--tpot-slo",
            "0.01",
            "--ttft-slo",
            "1.0",
            "--offline-prompt-len",
            "512",
            "--online-prompt-len",
            "16",
            "--trials",
            "4",
            "--check-trials",
            "2",
            "--safepoints",
            "1,2",
            "--overhead-reps",
            "2",
            "--bench-seed",
            "7",  # arrivals at 54%, 51%, 49% and 33% of the step
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    (md,) = out.glob("preempt-*.md")
    (js,) = out.glob("preempt-*.json")
    text = md.read_text()
    assert "conserve k=1" in text and "priority" in text and "Safepoint overhead" in text
    d = json.loads(js.read_text())
    assert d["machine"]["command"].startswith("conserve bench preempt --model")
    assert d["machine"]["date"]
    assert d["num_layers"] == 3 and d["reference_runs_agree"]
    assert [s["setting"] for s in d["settings"]] == ["conserve k=1", "conserve k=2", "priority"]
    for s in d["settings"]:
        assert len(s["trials"]) == 4 and s["wait_ms"]["n"] == 4
        # at least the first two run to the end (more when the step ended before the arrival)
        assert s["tokens_checked"] >= 2 and s["tokens_equal"] == s["tokens_checked"]
        for t in s["trials"]:
            assert 0 <= t["wait_ms"] <= t["ttft_ms"]
            layer = t["stopped_before_layer"]
            # any safepoint: inside the first layer too (the linear profile predicts far less
            # than the slowed layers take, so an arrival there finds the step past its
            # predicted end) or after the last one, before the LM head
            assert layer is None or (t["stop_requested"] and 0 <= layer <= 3)
        assert s["layer_preemptions"] <= s["stop_requests"]
    for s in d["settings"][:-1]:  # conserve stops the offline step between layers
        stops = [t for t in s["trials"] if t["stopped_before_layer"] is not None]
        assert s["layer_preemptions"] == len(stops) >= 1, s["setting"]
    prio = d["settings"][-1]
    assert prio["layer_preemptions"] == 0 and prio["stop_requests"] == 0  # never preemptible
    o = d["overhead"]
    assert o["check_ns"] > 0
    for label in ("prefill 512", "16 decodes @ 512"):
        assert set(o[label]["ratio"]) == {"1", "2"} and o[label]["ratio"]["1"]["median"] > 0
