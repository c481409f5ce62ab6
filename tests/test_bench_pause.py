"""`conserve bench pause` end to end at toy size (tiny random-weight model, a linear latency
profile): offline requests are really paused and resumed, the host tier restores what
recompute recomputes, tokens match an uninterrupted run; no timing is asserted."""

from __future__ import annotations

import json

from conserve.cli import main


def test_bench_pause_resumes_from_the_host_tier_and_recomputes_without_it(
    tiny_llama_dir, linear_profile, tmp_path
):
    out = tmp_path / "results"
    args = ["--model", str(tiny_llama_dir), "--dtype", "float32"]
    args += ["--latency-profile", linear_profile, "--tpot-slo", "0.01", "--ttft-slo", "1.0"]
    args += ["--host-kv-gb", "0.01", "--contexts", "64,200", "--generated", "5"]
    args += ["--job-requests", "4", "--job-prompt-len", "96", "--job-output-len", "40"]
    args += ["--job-pool-blocks", "24", "--online-interval", "0.002"]
    args += ["--online-prompt-len", "48", "--online-output-len", "4", "--output", str(out)]
    assert main(["bench", "pause", *args]) == 0
    (md,) = out.glob("pause-*.md")
    (js,) = out.glob("pause-*.json")
    assert "Resume cost per context length" in md.read_text()
    d = json.loads(js.read_text())
    assert d["machine"]["command"].startswith("conserve bench pause")
    host, rec = d["resume"]["by_mode"]["host tier"], d["resume"]["by_mode"]["recompute"]
    assert [r["prompt_len"] for r in host] == [64, 200] == [r["prompt_len"] for r in rec]
    for h, c in zip(host, rec, strict=True):
        assert h["paused"] and c["paused"] and h["tokens_equal"] and c["tokens_equal"]
        ctx = h["context_at_pause"]
        assert ctx == c["context_at_pause"] == h["prompt_len"] + 5
        # host tier: every full block before the last token comes back, the tail is computed
        assert h["tokens_restored"] == (ctx - 1) // 16 * 16 == h["blocks_restored"] * 16
        assert h["pauses"] == 1 and h["tokens_recomputed"] == ctx - 1 - h["tokens_restored"] < 16
        # recompute: everything computed before the pause is computed again
        assert c["tokens_restored"] == 0 and c["pauses"] == 0
        assert c["tokens_recomputed"] == ctx - 1
    p = d["pressure"]
    assert len(p["by_mode"]["host tier"]) == len(p["by_mode"]["recompute"]) == 2
    for h, c in zip(p["by_mode"]["host tier"], p["by_mode"]["recompute"], strict=True):
        assert h["tokens_equal"] == c["tokens_equal"] == 4
        assert h["min_agreeing_prefix"] == c["min_agreeing_prefix"] == 40
        assert h["offline_preemptions"] > 0 and c["offline_preemptions"] > 0
        assert h["blocks_checkpointed"] > 0 and c["blocks_checkpointed"] == 0
        assert c["tokens_restored"] == 0 and c["pauses"] == 0
        assert h["checkpoint_calls"] == h["steps"] > 0
