"""`conserve bench preempt`: how long an arriving online request waits while a long offline
prefill runs, with layer-wise preemption (policy conserve, a safepoint every k layers) and
without it (policy priority: the step runs to its end); and what the safepoint checks cost when
nothing is preempted.

One engine in this process (the default model). Each trial starts an offline request whose
whole prompt is one prefill step; at a seeded random moment of that step an online request
arrives from another thread, the way the server's engine-core pipe thread does it: it calls
`Engine.request_stop(prompt_len)`, then hands the request to the loop, which adds it between
steps. Measured: the wait from the arrival to the start of the step that carries the online
request (its own prefill), and its TTFT. Prefix caching is off so that every trial computes the
same prompt from scratch; the host tier is off (no memory pressure here).
"""

from __future__ import annotations

import argparse
import queue
import random
import statistics
import threading
import time
import timeit
from dataclasses import replace
from typing import Any

from conserve.bench.common import (
    StepClock,
    distribution,
    info_lines,
    machine_info,
    random_prompt,
    write_results,
)
from conserve.engine.engine import Engine
from conserve.engine.request import RequestClass
from conserve.sampling.params import SamplingParams
from conserve.tables import md_table


def add_preempt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preempt benchmark")
    g.add_argument("--offline-prompt-len", type=int, default=2048, help="one prefill step")
    g.add_argument("--offline-output-len", type=int, default=4, help="greedy tokens compared")
    g.add_argument("--online-prompt-len", type=int, default=64)
    g.add_argument("--trials", type=int, default=30, help="arrivals per setting")
    g.add_argument("--safepoints", default="1,2,4,8", help="values of k for policy conserve")
    g.add_argument(
        "--check-trials",
        type=int,
        default=2,
        help="trials per setting whose offline request runs to its end and has its greedy "
        "tokens compared with an uninterrupted run (the others are aborted once the online "
        "request has its first token)",
    )
    g.add_argument("--overhead-reps", type=int, default=5, help="interleaved reps per mode")
    g.add_argument("--bench-seed", type=int, default=0, help="arrival offsets and prompts")
    g.add_argument("--output", default="benchmarks/results", help="results directory")


# -- engine set-up ----------------------------------------------------------------------------


def build_engine(args: argparse.Namespace) -> tuple[Engine, StepClock]:
    from conserve.cli import engine_config

    cfg = engine_config(args)
    sched = replace(
        cfg.scheduler,
        policy="conserve",
        max_num_batched_tokens=max(cfg.scheduler.max_num_batched_tokens, args.offline_prompt_len),
    )
    cache = replace(
        cfg.cache,
        enable_prefix_caching=False,
        host_kv_gb=0.0,
        kv_cache_gb=cfg.cache.kv_cache_gb or 0.5,
    )
    engine = Engine.from_config(replace(cfg, scheduler=sched, cache=cache))
    clock = StepClock(engine.runner)
    engine.runner = clock
    return engine, clock


def use_policy(engine: Engine, policy: str) -> None:
    """Switch the scheduling policy of a built engine (same weights, same latency model)."""
    sc = replace(engine.config.scheduler, policy=policy)
    engine.config = replace(engine.config, scheduler=sc)
    engine.scheduler.config = sc


# -- one trial --------------------------------------------------------------------------------


def run_trial(
    engine: Engine,
    clock: StepClock,
    name: str,
    offline_prompt: list[int],
    online_prompt: list[int],
    offset_s: float,
    offline_params: SamplingParams,
    run_to_end: bool,
) -> dict[str, Any]:
    """One offline request, one online arrival `offset_s` after its first step started."""
    off, on = f"{name}-off", f"{name}-on"
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    arrival: dict[str, Any] = {}
    layer_stops = engine.num_layer_preemptions
    clock.reset()
    engine.add_request(off, offline_prompt, offline_params, RequestClass.OFFLINE)

    def arrive() -> None:
        clock.started.wait()
        delay = clock.steps[0][0] + offset_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrival["t"] = time.perf_counter()
        arrival["stop_requested"] = engine.request_stop(len(online_prompt))
        inbox.put(on)

    thread = threading.Thread(target=arrive, daemon=True)
    thread.start()
    first_token = None
    tokens = None
    added = False
    while first_token is None or (run_to_end and tokens is None):
        block = not engine.has_unfinished()  # as the engine core: block only when idle
        while not added:
            try:
                inbox.get(block=block)
            except queue.Empty:
                break
            engine.add_request(on, online_prompt, SamplingParams(temperature=0, max_tokens=1))
            added = True
        for out in engine.step():
            if out.request_id == on and first_token is None:
                first_token = time.perf_counter()
            if out.request_id == off and out.finished:
                tokens = list(out.outputs[0].token_ids)
    thread.join()
    engine.abort(off)
    engine.check_integrity()
    t = arrival["t"]
    start = clock.first_start(on, t)
    preempted_at = None
    if engine.num_layer_preemptions > layer_stops:
        preempted_at = engine.layer_preemptions[-1][1]
    return {
        "offset_ms": offset_s * 1e3,
        "wait_ms": (start - t) * 1e3,
        "ttft_ms": (first_token - t) * 1e3,
        "stop_requested": arrival["stop_requested"],
        "stopped_before_layer": preempted_at,
        "offline_tokens": tokens,
    }


def uninterrupted(
    engine: Engine, clock: StepClock, prompt: list[int], params: SamplingParams, reps: int
) -> tuple[list[float], list[list[int]]]:
    """Prefill-step seconds and greedy tokens of the offline request running alone."""
    times, tokens = [], []
    for i in range(reps):
        rid = f"alone-{len(engine.step_times)}-{i}"
        engine.add_request(rid, prompt, params, RequestClass.OFFLINE)
        first = len(engine.step_times)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens.append(list(out.outputs[0].token_ids))
        times.append(list(engine.step_times)[first])
    engine.check_integrity()
    return times, tokens


# -- safepoint overhead -----------------------------------------------------------------------


def safepoint_overhead(
    engine: Engine, clock: StepClock, ks: list[int], reps: int, prompt_len: int, seed: int
) -> dict[str, Any]:
    """The same synthetic steps through the runner with no stop check (`stop=None`) and with
    the engine's check at every k layers, never firing; modes interleaved in a shuffled order
    in every repetition. Ratios are taken within a repetition."""
    from conserve.engine.profiler import make_batch

    runner = clock.inner
    bs = engine.config.cache.block_size
    vocab = engine.tokenizer.vocab_size
    rng = random.Random(seed)
    shapes = {
        f"prefill {prompt_len}": ([(0, prompt_len)], reps),
        "16 decodes @ 512": ([(511, 1)] * 16, reps * 6),
    }
    stop_seq, step_seq = -1, 7

    def check() -> bool:  # what Engine._execute passes
        return stop_seq == step_seq

    saved_every = runner.safepoint_every
    out: dict[str, Any] = {}
    for label, (spec, n) in shapes.items():
        batch = make_batch(spec, bs, vocab, rng)
        runner.execute(batch)  # warm-up
        modes: list[int | None] = [None, *ks]
        ratios: dict[int, list[float]] = {k: [] for k in ks}
        base: list[float] = []
        for _ in range(n):
            order = modes[:]
            rng.shuffle(order)
            took: dict[int | None, float] = {}
            for k in order:
                runner.safepoint_every = k or 1
                took[k] = runner.execute(batch, None if k is None else check).elapsed_s
            base.append(took[None])
            for k in ks:
                ratios[k].append(took[k] / took[None])
        out[label] = {
            "reps": n,
            "no_check_ms": statistics.median(base) * 1e3,
            "ratio": {str(k): _spread(r) for k, r in ratios.items()},
        }
    runner.safepoint_every = saved_every
    num = 200_000
    per_call = timeit.timeit(check, number=num) / num
    out["check_ns"] = per_call * 1e9
    return out


def _spread(r: list[float]) -> dict[str, float]:
    s = sorted(r)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1]}


# -- the command ------------------------------------------------------------------------------


def run_preempt(args: argparse.Namespace) -> int:
    ks = [int(x) for x in args.safepoints.split(",") if x.strip()]
    info = machine_info(args.argv)
    engine, clock = build_engine(args)
    runner = clock.inner
    num_layers = len(runner.model.layers)
    rng = random.Random(args.bench_seed)
    vocab = engine.tokenizer.vocab_size
    offline_prompt = random_prompt(rng, args.offline_prompt_len, vocab)
    params = SamplingParams(temperature=0, max_tokens=args.offline_output_len, ignore_eos=True)
    print(f"[preempt] uninterrupted runs of {args.offline_prompt_len} tokens", flush=True)
    alone_s, ref_tokens = uninterrupted(engine, clock, offline_prompt, params, 3)
    step_s = statistics.median(alone_s[1:])  # the first run warms up
    reference = ref_tokens[0]
    settings = [(f"conserve k={k}", "conserve", k) for k in ks] + [("priority", "priority", 1)]
    offsets = [rng.random() * step_s for _ in range(args.trials)]
    results = []
    for label, policy, k in settings:
        use_policy(engine, policy)
        runner.safepoint_every = k
        trials = []
        for i, off in enumerate(offsets):
            online_prompt = random_prompt(rng, args.online_prompt_len, vocab)
            trials.append(
                run_trial(
                    engine,
                    clock,
                    f"{label}-{i}".replace(" ", ""),
                    offline_prompt,
                    online_prompt,
                    off,
                    params,
                    i < args.check_trials,
                )
            )
        checked = [t["offline_tokens"] for t in trials if t["offline_tokens"] is not None]
        waits = [t["wait_ms"] for t in trials]
        interval = step_s / num_layers * min(k, num_layers) if policy == "conserve" else step_s
        row = {
            "setting": label,
            "policy": policy,
            "safepoint_every": k if policy == "conserve" else None,
            "safepoint_interval_ms": interval * 1e3,
            "wait_ms": distribution(waits),
            "ttft_ms": distribution([t["ttft_ms"] for t in trials]),
            "stop_requests": sum(bool(t["stop_requested"]) for t in trials),
            "layer_preemptions": sum(t["stopped_before_layer"] is not None for t in trials),
            "tokens_checked": len(checked),
            "tokens_equal": sum(c == reference for c in checked),
            "trials": trials,
        }
        results.append(row)
        w = row["wait_ms"]
        print(
            f"[preempt] {label}: wait p50 {w['p50']:.0f} ms, max {w['max']:.0f} ms "
            f"(interval {interval * 1e3:.0f} ms)",
            flush=True,
        )
    use_policy(engine, "conserve")
    print("[preempt] safepoint overhead", flush=True)
    overhead = safepoint_overhead(
        engine, clock, ks, args.overhead_reps, args.offline_prompt_len, args.bench_seed
    )
    engine.check_integrity()
    data = {
        "machine": info,
        "model": engine.model_name,
        "dtype": engine.config.dtype,
        "num_layers": num_layers,
        "offline_prompt_len": args.offline_prompt_len,
        "online_prompt_len": args.online_prompt_len,
        "trials": args.trials,
        "step_s": step_s,
        "uninterrupted_step_s": alone_s,
        "reference_runs_agree": all(t == reference for t in ref_tokens),
        "tpot_slo_s": engine.config.scheduler.tpot_slo,
        "ttft_slo_s": engine.config.scheduler.ttft_slo,
        "settings": results,
        "overhead": overhead,
    }
    md = render(data)
    path = write_results(args.output, "preempt", md, data)
    print(md)
    print(f"results: {path}")
    return 0


def render(d: dict[str, Any]) -> str:
    lines = ["# Layer-wise preemption: online wait during a long offline prefill", ""]
    lines += info_lines(d["machine"])
    lines += [
        f"- model {d['model']} ({d['num_layers']} layers), {d['dtype']}; offline prompt "
        f"{d['offline_prompt_len']} tokens in one step, online prompt {d['online_prompt_len']} "
        f"tokens; {d['trials']} arrivals per setting, uniform over the step",
        f"- uninterrupted prefill step: {d['step_s'] * 1e3:.0f} ms (median of "
        f"{', '.join(f'{t * 1e3:.0f}' for t in d['uninterrupted_step_s'][1:])} ms after a "
        "warm-up run)",
        f"- SLOs: TPOT {d['tpot_slo_s']} s, TTFT {d['ttft_slo_s']} s (the monitor stops a step "
        "only when finishing it would exceed them)",
        "",
        "Wait = arrival to the start of the online request's own prefill step.",
        "",
    ]
    rows = []
    for r in d["settings"]:
        w, t = r["wait_ms"], r["ttft_ms"]
        iv = r["safepoint_interval_ms"]
        rows.append(
            [
                r["setting"],
                f"{iv:.0f}",
                f"{w['p50']:.0f}",
                f"{w['p90']:.0f}",
                f"{w['p99']:.0f}",
                f"{w['max']:.0f}",
                f"{w['max'] / iv:.2f}",
                f"{t['p50']:.0f}",
                f"{t['p99']:.0f}",
                f"{r['layer_preemptions']}/{len(r['trials'])}",
                f"{r['tokens_equal']}/{r['tokens_checked']}",
            ]
        )
    lines.append(
        md_table(
            [
                "setting",
                "interval ms",
                "wait p50",
                "p90",
                "p99",
                "max",
                "max / interval",
                "TTFT p50",
                "TTFT p99",
                "stopped",
                "tokens equal",
            ],
            rows,
        )
    )
    o = d["overhead"]
    lines += [
        "",
        "Interval = uninterrupted step time / layers x k (priority: the whole step). "
        "`tokens equal`: trials run to the end whose offline greedy tokens equal the "
        f"uninterrupted run's (the uninterrupted runs agree with each other: "
        f"{d['reference_runs_agree']}).",
        "",
        "## Safepoint overhead when nothing is preempted",
        "",
        f"One stop check costs {o['check_ns']:.0f} ns (the engine's closure, timeit). Step time "
        "with the check every k layers (never firing) / without any check, same step, modes "
        "interleaved; median [min, max] over repetitions:",
        "",
    ]
    ks = list(next(v for v in o.values() if isinstance(v, dict))["ratio"])
    rows = []
    for label, v in o.items():
        if not isinstance(v, dict):
            continue
        cells = [
            f"{v['ratio'][k]['median']:.3f} [{v['ratio'][k]['min']:.3f}, "
            f"{v['ratio'][k]['max']:.3f}]"
            for k in ks
        ]
        rows.append([label, str(v["reps"]), f"{v['no_check_ms']:.1f}", *cells])
    lines.append(md_table(["step", "reps", "no check ms", *[f"k={k}" for k in ks]], rows))
    return "\n".join(lines) + "\n"
