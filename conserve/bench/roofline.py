"""`conserve bench roofline`: where a model step's time goes, against what this machine allows.

For decode steps of 1 to 256 sequences and prefill chunks of 64 to 2048 tokens (with no cached
context and with some), the engine's own steps are timed in parts (linear layers, attention,
the other per-layer ops, LM head and sampling, host-side work) and each part is set against
its two floors, measured in the same run: the bytes it must move over the memory bandwidth
measured here, and its FLOPs over the peak GEMM rate measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch

from conserve.bench.common import StepClock, machine_info, write_results
from conserve.bench.roofline_cost import (
    StepShape,
    measure_bandwidth,
    measure_peak_flops,
    step_costs,
)
from conserve.bench.roofline_report import markdown, plot
from conserve.engine.batch import ScheduledBatch
from conserve.engine.engine import Engine
from conserve.engine.step_parts import StepParts
from conserve.engine_args import engine_config
from conserve.llm import LLM
from conserve.sampling.params import SamplingParams

PARTS = ("linear", "attention", "other", "head_sampling", "host")


def add_roofline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--decode-batches",
        default="1,2,4,8,16,32,64,128,256",
        help="decode steps of this many sequences ('' to skip)",
    )
    g.add_argument(
        "--decode-context", type=int, default=256, help="prompt tokens of each decode sequence"
    )
    g.add_argument(
        "--prefill-chunks",
        default="64,128,256,512,1024,2048",
        help="prefill steps of this many new tokens ('' to skip)",
    )
    g.add_argument(
        "--cached-context",
        type=int,
        default=1024,
        help="the prefill chunks are measured again after this many cached tokens (0: not)",
    )
    g.add_argument("--repeats", type=int, default=7, help="steps timed per shape (median)")
    g.add_argument("--output", default="benchmarks/results", help="results directory")


def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def run_roofline(args: argparse.Namespace) -> int:
    cfg = engine_config(args)
    decode, chunks = _csv_ints(args.decode_batches), _csv_ints(args.prefill_chunks)
    sc = cfg.scheduler
    sc = dataclasses.replace(
        sc,
        max_num_seqs=max([sc.max_num_seqs, *decode]),
        max_num_batched_tokens=max([sc.max_num_batched_tokens, *chunks]),
    )
    cfg = dataclasses.replace(cfg, scheduler=sc)
    eng = LLM.from_config(cfg).engine
    dtype = eng.config.torch_dtype
    info = machine_info() | {"dtype": eng.config.dtype, "model": eng.model_name}
    info["kernels"] = eng.runner.kernels is not None
    # The machine's speed moves (a shared host: its read rate measured 38 and 66 GB/s within
    # one run), so the rates are measured before, between and after the steps, and the floors
    # use the best of each: what this machine showed it can do during the run.
    measured = [_measure_floors(dtype, "before the steps")]
    rows = []
    with _TimedParts(eng) as parts:
        rows += _decode_rows(eng, parts, decode, args)
        measured.append(_measure_floors(dtype, "between decode and prefill"))
        for cached in sorted({0, args.cached_context}):
            rows += _prefill_rows(eng, parts, chunks, cached, args)
    measured.append(_measure_floors(dtype, "after the steps"))
    eng.check_integrity()
    floors = {k: max(m[k] for m in measured) for k in measured[0]}
    floors["measurements"] = len(measured)
    kv_elem = eng.runner.kv.k[0].element_size()
    for r in rows:
        costs = step_costs(eng.runner.model, r["shape"], kv_elem)
        r["floors_s"] = {
            k: c.floor_s(floors["bandwidth"], floors["peak"]) for k, c in costs.items()
        }
        r["bytes"] = sum(c.bytes for c in costs.values())
        r["flops"] = sum(c.flops for c in costs.values())
        r["bytes_floor_s"] = r["bytes"] / floors["bandwidth"]
        r["flops_floor_s"] = r["flops"] / floors["peak"]
    results = {"machine": info, "floors": floors, "steps": [_jsonable(r) for r in rows]}
    stamp_path = write_results(args.output, "roofline", markdown(results), results)
    png = plot(results, stamp_path.with_suffix(".png"))
    print(markdown(results))
    print(f"written to {stamp_path}" + (f" and {png}" if png else ""))
    return 0


def _measure_floors(dtype: torch.dtype, when: str) -> dict[str, float]:
    print(f"measuring memory bandwidth and peak GEMM rate {when} ...")
    f = measure_bandwidth() | measure_peak_flops(dtype)
    print(
        f"bandwidth {f['bandwidth'] / 1e9:.1f} GB/s, peak {f['peak'] / 1e12:.2f} TFLOP/s ({dtype})"
    )
    return f


class _TimedParts:
    """A `StepParts` on the engine's runner (and its model's linear layers) while in use."""

    def __init__(self, eng: Engine) -> None:
        self.runner = eng.runner

    def __enter__(self) -> StepParts:
        parts = StepParts()
        parts.attach(self.runner.model)
        self.runner.parts = parts
        return parts

    def __exit__(self, *exc) -> None:
        self.runner.parts.detach()
        self.runner.parts = None


def shape_of(batch: ScheduledBatch) -> StepShape:
    chunks = batch.chunks
    kinds = {c.num_tokens == 1 for c in chunks}
    return StepShape(
        kind="decode" if kinds == {True} else "prefill",
        rows=sum(c.num_tokens for c in chunks),
        seqs=len(chunks),
        sample_rows=sum(c.sample is not None for c in chunks),
        attended=sum(
            c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) // 2 for c in chunks
        ),
        cached=sum(c.start for c in chunks),
    )


def _time_step(eng: Engine, parts: StepParts, clock: StepClock) -> dict:
    """Run one engine step and split its time into parts (seconds)."""
    parts.reset()
    clock.reset()
    t0 = time.perf_counter()
    eng.step()
    wall = time.perf_counter() - t0
    (rec,) = clock.ended
    s = parts.seconds
    split = {
        "linear": s["linear"],
        "attention": s["attention"],
        "other": s["layers"] - s["linear"] - s["attention"],
        "head_sampling": s["logits"] + s["sampling"],
    }
    split["host"] = wall - sum(split.values())  # planning, tensors, applying, the rest
    return {"shape": shape_of(rec.batch), "wall": wall, "parts": split}


def _summarize(samples: list[dict]) -> dict:
    shapes = {s["shape"].label for s in samples}
    assert len(shapes) == 1, f"steps of different shapes: {shapes}"
    mid = sorted(samples, key=lambda s: s["wall"])[len(samples) // 2]
    return {
        "shape": mid["shape"],
        "step_s": statistics.median(s["wall"] for s in samples),
        "parts_s": {k: statistics.median(s["parts"][k] for s in samples) for k in PARTS},
    }


def _decode_rows(eng: Engine, parts: StepParts, batches: list[int], args) -> list[dict]:
    """Sequences are added as the batch grows; each size is timed once all have their first
    token (pure decode steps of exactly that many sequences)."""
    rng = random.Random(0)
    vocab = eng.tokenizer.vocab_size
    room = eng.max_model_len - args.decode_context  # nobody finishes while timed
    params = SamplingParams(temperature=0, max_tokens=room, ignore_eos=True)
    ids: list[str] = []
    rows = []
    clock = StepClock()
    for b in sorted(batches):
        new = [f"roofline-decode-{i}" for i in range(len(ids), b)]
        for rid in new:
            prompt = [rng.randrange(256, vocab) for _ in range(args.decode_context)]
            eng.add_request(rid, prompt, params)
        ids += new
        waiting = set(new)
        while waiting:
            waiting -= {o.request_id for o in eng.step() if o.outputs[0].token_ids}
        eng.add_observer(clock)
        try:
            samples = [_time_step(eng, parts, clock) for _ in range(args.repeats)]
        finally:
            eng.remove_observer(clock)
        rows.append(_summarize(samples))
        assert rows[-1]["shape"].seqs == b and rows[-1]["shape"].kind == "decode"
        print(f"{rows[-1]['shape'].label}: {rows[-1]['step_s'] * 1e3:.1f} ms")
    for rid in ids:
        eng.abort(rid)
    return rows


def _prefill_rows(
    eng: Engine, parts: StepParts, chunks: list[int], cached: int, args
) -> list[dict]:
    """Each timed step is the prompt of a new request: `cached` tokens the prefix cache holds
    (a request with that prompt ran first) and `chunk` new ones, in one step."""
    rng = random.Random(f"prefill-{cached}")  # prompts unlike any other of the run
    vocab = eng.tokenizer.vocab_size
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prefix = [rng.randrange(256, vocab) for _ in range(cached)]
    if cached:
        eng.add_request("roofline-prefix", prefix, one)
        while eng.has_unfinished():
            eng.step()
    rows = []
    clock = StepClock()
    eng.add_observer(clock)
    try:
        for n in chunks:
            samples = []
            for i in range(args.repeats):
                prompt = prefix + [rng.randrange(256, vocab) for _ in range(n)]
                eng.add_request(f"roofline-prefill-{cached}-{n}-{i}", prompt, one)
                samples.append(_time_step(eng, parts, clock))
                while eng.has_unfinished():
                    eng.step()
            rows.append(_summarize(samples))
            shape = rows[-1]["shape"]
            assert shape.rows == n and shape.cached == cached, f"unexpected step {shape}"
            print(f"{shape.label}: {rows[-1]['step_s'] * 1e3:.1f} ms")
    finally:
        eng.remove_observer(clock)
    return rows


def _jsonable(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "shape"} | {
        "label": r["shape"].label,
        "shape": dataclasses.asdict(r["shape"]),
    }
