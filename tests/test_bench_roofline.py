"""`conserve bench roofline`: the floors' arithmetic against a hand count, and a run on a tiny
model whose steps have the asked shapes and whose parts add up to the step."""

from __future__ import annotations

import json

import pytest

from conserve import LLM
from conserve.bench.roofline_cost import StepShape, step_costs
from conserve.cli import build_parser
from conserve.kernels import cpu_kernels


def test_step_costs_count_weights_kv_and_flops_of_the_step(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32")
    model = llm.engine.runner.model
    # tiny llama: hidden 64, intermediate 128, 3 layers, 4 heads of 16, 2 KV heads, untied
    vocab = model.config.vocab_size
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 64 * 256 + 128 * 64
    # decode of 3 sequences with 10, 20 and 30 tokens before the new one
    shape = StepShape("decode", rows=3, seqs=3, sample_rows=3, attended=11 + 21 + 31, cached=60)
    c = step_costs(model, shape, kv_elem=2)
    assert c["linear"].bytes == 3 * per_layer * 4
    assert c["linear"].flops == 2 * 3 * 3 * per_layer
    assert c["lm_head"].bytes == 64 * vocab * 4 and c["lm_head"].flops == 2 * 3 * 64 * vocab
    kv_token = 2 * 3 * 32 * 2  # K and V, 3 layers, 2 heads x 16, 2 bytes each
    assert c["attention"].bytes == (60 + 3) * kv_token
    assert c["attention"].flops == 4 * 3 * 4 * 16 * 63
    # a prefill chunk that samples nothing reads no vocabulary projection
    chunk = StepShape("prefill", rows=8, seqs=1, sample_rows=0, attended=36, cached=0)
    assert step_costs(model, chunk, 2)["lm_head"].bytes == 0
    assert chunk.label == "prefill 8"


def test_roofline_run_times_the_asked_shapes_in_parts(tiny_llama_dir, tmp_path):
    args = build_parser().parse_args(
        ["bench", "roofline", "--model", str(tiny_llama_dir), "--dtype", "float32"]
        + ["--decode-batches", "1,3", "--prefill-chunks", "16,40", "--cached-context", "32"]
        + ["--decode-context", "24", "--repeats", "3", "--output", str(tmp_path)]
    )
    assert args.func(args) == 0
    (path,) = tmp_path.glob("roofline-*.json")
    res = json.loads(path.read_text())
    labels = [s["label"] for s in res["steps"]]
    assert labels == [
        "decode x1",
        "decode x3",
        "prefill 16",
        "prefill 40",
        "prefill 16 +32 cached",
        "prefill 40 +32 cached",
    ]
    floors = res["floors"]
    assert floors["bandwidth"] > 1e8 and floors["peak"] > 1e8
    if cpu_kernels() is not None:
        # the compiled read probe ran, and the floors use the fastest of the three rates
        assert floors["read_loads"] > 1e8
    # measured before, between and after the steps; each rate the best of the three
    assert floors["measurements"] == 3
    rates = [floors[k] for k in ("read", "copy", "read_loads") if k in floors]
    assert floors["bandwidth"] == max(rates)
    assert "read (compiled loads)" in path.with_suffix(".md").read_text() or len(rates) == 2
    for s in res["steps"]:
        parts = s["parts_s"]
        assert parts["linear"] > 0 and parts["attention"] > 0 and parts["head_sampling"] > 0
        assert parts["other"] > 0
        # the parts are timed separately; what is left of the step for the host is not negative
        assert parts["host"] >= 0
        assert sum(parts.values()) == pytest.approx(s["step_s"], rel=0.3)
        assert s["step_s"] >= max(s["bytes_floor_s"], s["flops_floor_s"])
    assert (tmp_path / path.name.replace(".json", ".md")).is_file()
