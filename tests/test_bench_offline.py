"""`conserve bench offline`: the job it builds, the ceiling it reports on what any order
could save, and one end-to-end run on a tiny model."""

from __future__ import annotations

import pytest

from conserve.bench.offline import build_job, order_headroom, ratios_of


def test_job_concatenates_the_three_tasks_with_exact_lengths(default_tokenizer):
    lines, desc = build_job(30, default_tokenizer, "m", seed=0)
    assert desc["tasks"] == {"few-shot": 10, "summary": 10, "generation": 10}
    kinds = [x["custom_id"].split("-")[0] for x in lines]
    assert kinds == ["few"] * 10 + ["summary"] * 10 + ["generation"] * 10
    for x in lines:
        body = x["body"]
        assert body["ignore_eos"] and body["min_tokens"] == body["max_tokens"]
    assert desc["max_output_tokens"] == max(x["body"]["max_tokens"] for x in lines)
    assert desc["output_tokens"] == sum(x["body"]["max_tokens"] for x in lines)
    assert len({x["custom_id"] for x in lines}) == 30
    again, _ = build_job(30, default_tokenizer, "m", seed=0)
    assert again == lines


def _run(**kw):
    run = {
        "wall_s": 100.0,
        "busy_s": 98.0,
        "steps": 1000,
        "prompt_tokens": 50_000,
        "prefix_hits": 10_000,
        "output_tokens": 16_000,
        "completed": 100,
    }
    run.update(kw)
    return run


def test_headroom_counts_the_fixed_cost_of_the_steps_above_the_binding_bound():
    desc = {"max_output_tokens": 200}
    h = order_headroom(_run(), desc, seats=32, budget=2048, fixed_s=0.02)
    # seats: 16000 / 32 = 500; tokens: (40000 + 16000 - 100) / 2048 -> 28; longest: 200
    assert h["step_bounds"] == {"seats": 500, "tokens": 28, "longest output": 200}
    assert h["least_steps"] == 500 and h["binding"] == "seats"
    # 20 ms fixed + 2 s between steps over 1000 steps
    assert h["per_step_s"] == pytest.approx(0.022)
    assert h["saveable_s"] == pytest.approx(0.022 * 500)
    assert h["max_speedup"] == pytest.approx(100 / (100 - 11))


def test_a_run_at_its_bound_has_nothing_to_gain():
    desc = {"max_output_tokens": 600}
    h = order_headroom(_run(steps=600, busy_s=100.0), desc, 32, 2048, 0.02)
    assert h["binding"] == "longest output"
    assert h["saveable_s"] == 0 and h["max_speedup"] == 1.0


def test_ratios_compare_blend_with_fcfs_and_dfs():
    runs = [
        {"order": "fcfs", "tokens_per_s": 100.0, "prefix_hits": 50},
        {"order": "dfs", "tokens_per_s": 110.0, "prefix_hits": 100},
        {"order": "blend", "tokens_per_s": 121.0, "prefix_hits": 96},
    ]
    r = ratios_of(runs)
    assert r["throughput blend/fcfs"] == pytest.approx(1.21)
    assert r["throughput blend/dfs"] == pytest.approx(1.1)
    assert r["prefix hits blend/dfs"] == pytest.approx(0.96)


def test_doc_qa_lines_share_their_document_and_shuffling_mixes_tasks(default_tokenizer):
    from conserve.bench.offline import QUESTIONS_PER_DOC

    lines, desc = build_job(
        24, default_tokenizer, "m", seed=1, tasks=("doc-qa", "generation"), arrange="shuffled"
    )
    assert desc["tasks"] == {"doc-qa": 12, "generation": 12}
    qa = [x["body"]["prompt"] for x in lines if x["custom_id"].startswith("doc-qa")]
    # 12 questions over 2 documents: each document is the start of 6 prompts
    firsts = {tuple(p[:64]) for p in qa}
    assert len(firsts) == 12 // QUESTIONS_PER_DOC
    kinds = [x["custom_id"].split("-")[0] for x in lines]
    assert kinds != sorted(kinds, key=kinds.index)  # not one task after the other


def test_rounds_rotate_which_order_goes_first_and_the_fastest_run_is_compared():
    from conserve.bench.offline import best_runs, rounds

    assert rounds(["fcfs", "dfs", "blend"], 4) == [
        ["fcfs", "dfs", "blend"],
        ["dfs", "blend", "fcfs"],
        ["blend", "fcfs", "dfs"],
        ["fcfs", "dfs", "blend"],
    ]
    runs = [
        {"order": "fcfs", "tokens_per_s": 90.0},
        {"order": "dfs", "tokens_per_s": 120.0},
        {"order": "fcfs", "tokens_per_s": 130.0},
        {"order": "dfs", "tokens_per_s": 100.0},
    ]
    assert [(r["order"], r["tokens_per_s"]) for r in best_runs(runs)] == [
        ("fcfs", 130.0),
        ("dfs", 120.0),
    ]


def test_bench_offline_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path):
    """Two orders through the `batch run` path on fresh engine cores: the results files hold
    one run per order, every line done, and the KV pool size the engine reported."""
    import json

    from conserve.cli import main

    out = tmp_path / "results"
    argv = ["bench", "offline", "--model", str(tiny_llama_dir), "--dtype", "float32"]
    argv += ["--num-requests", "6", "--tasks", "few-shot,summary", "--order", "fcfs,blend"]
    argv += ["--kv-cache-gb", "0.05", "--output", str(out)]
    assert main(argv) == 0
    (js,) = out.glob("offline-*.json")
    d = json.loads(js.read_text())
    assert [r["order"] for r in d["runs"]] == ["fcfs", "blend"]
    for r in d["runs"]:
        assert r["completed"] == 6 and r["failed"] == 0 and r["steps"] > 0
        assert r["max_in_flight"] <= 32 and r["headroom"]["least_steps"] > 0
    assert d["job"]["kv_blocks"] > 0 and "const" in d["job"]["latency_profile"]
    assert f"KV cache {d['job']['kv_blocks']} blocks" in next(out.glob("offline-*.md")).read_text()
