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

The safepoint interval is fixed when an engine starts, so each k gets an engine of its own
(same weights; one warm-up run each); priority runs on the last of them after
`Engine.set_policy`. Steps are observed through a `StepClock` observer. The overhead of the
checks is measured on runners built here around the engine's model, one per k.
"""

from __future__ import annotations

import argparse
import gc
import queue
import random
import statistics
import threading
import time
import timeit
from dataclasses import dataclass, field, replace
from typing import Any

import torch

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
from conserve.engine.runner import ModelRunner
from conserve.engine_args import engine_config
from conserve.kernels import cpu_kernels
from conserve.kv.cache import KVTensors
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


def build_engine(args: argparse.Namespace, safepoint_every: int) -> Engine:
    """Policy conserve with a safepoint every `safepoint_every` layers; the offline prompt fits
    one step; no prefix caching, no host tier."""
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
    cfg = replace(cfg, safepoint_every=safepoint_every, scheduler=sched, cache=cache)
    return Engine.from_config(cfg)


@dataclass
class Rig:
    """The engine under test (one at a time) and the clock that observes its steps."""

    args: argparse.Namespace
    clock: StepClock = field(default_factory=StepClock)
    engine: Engine | None = None
    safepoint_every: int | None = None

    def engine_for(self, k: int) -> tuple[Engine, bool]:
        """An engine with a safepoint every k layers, and whether it was built just now (the
        current engine when it has that interval)."""
        if self.engine is not None and self.safepoint_every == k:
            return self.engine, False
        self.engine = None
        gc.collect()  # free the previous engine's KV pool before the next one allocates its own
        self.engine = build_engine(self.args, k)
        self.engine.add_observer(self.clock)
        self.safepoint_every = k
        return self.engine, True


@dataclass(frozen=True)
class Workload:
    """What every setting runs: the same offline request, the same arrival offsets."""

    offline_prompt: list[int]
    params: SamplingParams
    reference: list[int]  # the offline request's greedy tokens, uninterrupted
    offsets: list[float]  # arrival after the offline step started, seconds, one per trial
    online_prompt_len: int
    check_trials: int


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
    clock.reset()
    engine.add_request(off, offline_prompt, offline_params, RequestClass.OFFLINE)
    thread = threading.Thread(
        target=_arrive,
        args=(engine, clock, offset_s, len(online_prompt), inbox, arrival),
        daemon=True,
    )
    thread.start()
    first_token, tokens = _serve(engine, inbox, off, on, online_prompt, run_to_end)
    thread.join()
    engine.abort(off)
    engine.check_integrity()
    t = arrival["t"]
    stops = clock.stopped_layers()
    return {
        "offset_ms": offset_s * 1e3,
        "wait_ms": (clock.first_start(on, t) - t) * 1e3,
        "ttft_ms": (first_token - t) * 1e3,
        "stop_requested": arrival["stop_requested"],
        "stopped_before_layer": stops[-1] if stops else None,
        "offline_tokens": tokens,
    }


def _arrive(
    engine: Engine,
    clock: StepClock,
    offset_s: float,
    prompt_len: int,
    inbox: queue.SimpleQueue,
    arrival: dict[str, Any],
) -> None:
    """The online arrival, from another thread as the engine core's pipe thread makes it: ask
    for a stop of the running step, then hand the request to the loop."""
    clock.started.wait()
    delay = clock.steps[0][0] + offset_s - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    arrival["t"] = time.perf_counter()
    arrival["stop_requested"] = engine.request_stop(prompt_len)
    inbox.put(True)


def _serve(
    engine: Engine,
    inbox: queue.SimpleQueue,
    off: str,
    on: str,
    online_prompt: list[int],
    run_to_end: bool,
) -> tuple[float, list[int] | None]:
    """The engine loop as the core runs it, taking the online request in between steps, until
    the online request has its first token (and, with `run_to_end`, the offline one is done).
    Returns when the first token came (perf_counter) and the offline greedy tokens."""
    first_token: float | None = None
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
    return first_token, tokens


def uninterrupted(
    engine: Engine, clock: StepClock, prompt: list[int], params: SamplingParams, reps: int
) -> tuple[list[float], list[list[int]]]:
    """Prefill-step seconds and greedy tokens of the offline request running alone."""
    times, tokens = [], []
    for i in range(reps):
        rid = f"alone-{engine.stats().num_steps}-{i}"
        clock.reset()
        engine.add_request(rid, prompt, params, RequestClass.OFFLINE)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens.append(list(out.outputs[0].token_ids))
        times.append(clock.run_times()[0])
    engine.check_integrity()
    return times, tokens


# -- one setting ------------------------------------------------------------------------------


def run_setting(
    rig: Rig, label: str, k: int | None, w: Workload, rng: random.Random, step_s: float
) -> dict[str, Any]:
    """Every trial of one setting: policy conserve with a safepoint every k layers, or (k None)
    policy priority on the current engine, whose steps then always run to their end."""
    if k is None:
        engine = rig.engine
        engine.set_policy("priority")
    else:
        engine, fresh = rig.engine_for(k)
        if fresh:
            uninterrupted(engine, rig.clock, w.offline_prompt, w.params, 1)  # warm-up
    num_layers = engine.model_config.num_layers
    trials = []
    for i, off in enumerate(w.offsets):
        online_prompt = random_prompt(rng, w.online_prompt_len, engine.tokenizer.vocab_size)
        name = f"{label}-{i}".replace(" ", "")
        trials.append(
            run_trial(
                engine,
                rig.clock,
                name,
                w.offline_prompt,
                online_prompt,
                off,
                w.params,
                i < w.check_trials,
            )
        )
    checked = [t["offline_tokens"] for t in trials if t["offline_tokens"] is not None]
    interval = step_s if k is None else step_s / num_layers * min(k, num_layers)
    return {
        "setting": label,
        "policy": engine.config.scheduler.policy,
        "safepoint_every": k,
        "safepoint_interval_ms": interval * 1e3,
        "wait_ms": distribution([t["wait_ms"] for t in trials]),
        "ttft_ms": distribution([t["ttft_ms"] for t in trials]),
        "stop_requests": sum(bool(t["stop_requested"]) for t in trials),
        "layer_preemptions": sum(t["stopped_before_layer"] is not None for t in trials),
        "tokens_checked": len(checked),
        "tokens_equal": sum(c == w.reference for c in checked),
        "trials": trials,
    }


# -- safepoint overhead -----------------------------------------------------------------------


def overhead_runners(
    engine: Engine, ks: list[int], num_blocks: int
) -> dict[int | None, ModelRunner]:
    """Runners around the engine's model, one per safepoint interval k (None: the runner of
    the no-check mode), sharing a KV pool of `num_blocks` of their own (the engine's stays
    untouched). Attention as `Engine.from_config` chooses it."""
    cfg = engine.config
    device = torch.device(cfg.device)
    kv = KVTensors(engine.model_config, num_blocks, cfg.cache.block_size, cfg.torch_dtype, device)
    use_kernel = cfg.attention == "cpu-kernel" or (cfg.attention == "auto" and device.type == "cpu")
    kernels = cpu_kernels() if use_kernel else None
    model = engine.runner.model
    made = {
        k: ModelRunner(model, kv, engine.max_model_len, device, cfg.seed, kernels, k)
        for k in sorted({1, *ks})
    }
    return {None: made[1], **made}


def safepoint_overhead(
    engine: Engine, ks: list[int], reps: int, prompt_len: int, seed: int
) -> dict[str, Any]:
    """The same synthetic steps through a runner with no stop check (`stop=None`) and with
    the engine's check at every k layers, never firing; modes interleaved in a shuffled order
    in every repetition. Ratios are taken within a repetition."""
    from conserve.engine.profiler import make_batch

    bs = engine.config.cache.block_size
    vocab = engine.tokenizer.vocab_size
    rng = random.Random(seed)
    shapes = {
        f"prefill {prompt_len}": ([(0, prompt_len)], reps),
        "16 decodes @ 512": ([(511, 1)] * 16, reps * 6),
    }
    blocks = max(sum(-(-(s + n) // bs) for s, n in spec) for spec, _ in shapes.values())
    runners = overhead_runners(engine, ks, blocks)
    stop_seq, step_seq = -1, 7

    def check() -> bool:  # what Engine._execute passes
        return stop_seq == step_seq

    out: dict[str, Any] = {}
    for label, (spec, n) in shapes.items():
        batch = make_batch(spec, bs, vocab, rng)
        for runner in runners.values():
            runner.execute(batch)  # warm-up
        out[label] = _interleaved(runners, ks, batch, check, n, rng)
    num = 200_000
    per_call = timeit.timeit(check, number=num) / num
    out["check_ns"] = per_call * 1e9
    return out


def _interleaved(
    runners: dict[int | None, ModelRunner],
    ks: list[int],
    batch: Any,
    check: Any,
    n: int,
    rng: random.Random,
) -> dict[str, Any]:
    modes: list[int | None] = [None, *ks]
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    base: list[float] = []
    for _ in range(n):
        order = modes[:]
        rng.shuffle(order)
        took: dict[int | None, float] = {}
        for k in order:
            took[k] = runners[k].execute(batch, None if k is None else check).elapsed_s
        base.append(took[None])
        for k in ks:
            ratios[k].append(took[k] / took[None])
    return {
        "reps": n,
        "no_check_ms": statistics.median(base) * 1e3,
        "ratio": {str(k): _spread(r) for k, r in ratios.items()},
    }


def _spread(r: list[float]) -> dict[str, float]:
    s = sorted(r)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1]}


# -- the command ------------------------------------------------------------------------------


def run_preempt(args: argparse.Namespace) -> int:
    ks = [int(x) for x in args.safepoints.split(",") if x.strip()]
    info = machine_info(args.argv)
    rig = Rig(args)
    engine, _ = rig.engine_for(ks[0] if ks else 1)
    rng = random.Random(args.bench_seed)
    offline_prompt = random_prompt(rng, args.offline_prompt_len, engine.tokenizer.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=args.offline_output_len, ignore_eos=True)
    print(f"[preempt] uninterrupted runs of {args.offline_prompt_len} tokens", flush=True)
    alone_s, ref_tokens = uninterrupted(engine, rig.clock, offline_prompt, params, 3)
    step_s = statistics.median(alone_s[1:])  # the first run warms up
    offsets = [rng.random() * step_s for _ in range(args.trials)]
    w = Workload(
        offline_prompt, params, ref_tokens[0], offsets, args.online_prompt_len, args.check_trials
    )
    settings = [(f"conserve k={k}", k) for k in ks] + [("priority", None)]
    results = []
    for label, k in settings:
        row = run_setting(rig, label, k, w, rng, step_s)
        results.append(row)
        wait, interval = row["wait_ms"], row["safepoint_interval_ms"]
        print(
            f"[preempt] {label}: wait p50 {wait['p50']:.0f} ms, max {wait['max']:.0f} ms "
            f"(interval {interval:.0f} ms)",
            flush=True,
        )
    print("[preempt] safepoint overhead", flush=True)
    engine = rig.engine
    overhead = safepoint_overhead(
        engine, ks, args.overhead_reps, args.offline_prompt_len, args.bench_seed
    )
    engine.check_integrity()
    data = {
        "machine": info,
        "model": engine.model_name,
        "dtype": engine.config.dtype,
        "num_layers": engine.model_config.num_layers,
        "offline_prompt_len": args.offline_prompt_len,
        "online_prompt_len": args.online_prompt_len,
        "trials": args.trials,
        "step_s": step_s,
        "uninterrupted_step_s": alone_s,
        "reference_runs_agree": all(t == w.reference for t in ref_tokens),
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


# -- the results file -------------------------------------------------------------------------


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
        _settings_table(d["settings"]),
    ]
    lines += _overhead_section(d)
    return "\n".join(lines) + "\n"


def _settings_table(settings: list[dict[str, Any]]) -> str:
    rows = []
    for r in settings:
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
    head = ["setting", "interval ms", "wait p50", "p90", "p99", "max", "max / interval"]
    head += ["TTFT p50", "TTFT p99", "stopped", "tokens equal"]
    return md_table(head, rows)


def _overhead_section(d: dict[str, Any]) -> list[str]:
    o = d["overhead"]
    lines = [
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
    return lines
