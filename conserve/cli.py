"""The `conserve` command line: generate, serve, profile, batch run, and one `bench`
subcommand per row of the benchmark table (`conserve.bench.registry`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from conserve.config import EngineConfig
from conserve.engine_args import ConfigError, EngineArgs, engine_config
from conserve.model.config import UnsupportedModelError
from conserve.model.loader import ModelNotFoundError


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine config of a command, with the checks that need to know the policies."""
    from conserve.engine.policy import policy_class

    cfg = engine_config(args)
    uses_host_tier = policy_class(cfg.scheduler.policy).uses_host_tier
    if cfg.cache.host_kv_path and (not uses_host_tier or cfg.cache.host_kv_gb <= 0):
        raise ConfigError(
            "--host-kv-path backs the host tier, which only --policy conserve with "
            "--host-kv-gb > 0 has"
        )
    return cfg


def cmd_generate(args: argparse.Namespace) -> int:
    from conserve.llm import LLM
    from conserve.sampling.params import SamplingParams

    llm = LLM.from_config(_engine_config(args))
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
    from functools import partial

    from conserve.cluster.args import check_cluster_args, make_client, uses_ray
    from conserve.server.run import serve
    from conserve.server.state import ServerSettings

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
        restart_engine=not args.no_engine_restart,
    )
    check_cluster_args(args)
    config = _engine_config(args)
    factory = None
    if uses_ray(args):
        factory = partial(make_client, config, args)
    serve(config, settings, args.host, args.port, args.shutdown_timeout, args.verbose, factory)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from conserve.engine.engine import Engine
    from conserve.engine.profiler import (
        NoisyMachineError,
        build_profile,
        profile_path,
        report_markdown,
    )

    cfg = _engine_config(args)
    # the profile times the runner directly: the engine needs no profile to be made
    engine = Engine.from_config(replace(cfg, scheduler=replace(cfg.scheduler, policy="fcfs")))
    if args.check:
        return _profile_check(args, engine)
    try:
        report = build_profile(engine, reps=args.reps, heldout_count=args.heldout_count)
    except NoisyMachineError as e:
        print(f"conserve: error: {e}\nNothing was saved.", file=sys.stderr)
        return 1
    print(report_markdown(report, engine))
    if args.output:
        from conserve.bench.common import machine_info, write_results

        md = report_markdown(report, engine, machine_info())
        print(f"report: {write_results(args.output, 'profile', md, report.as_dict())}")
    if not report.within_bound:
        print(
            f"conserve: error: the held-out median error {report.heldout_median_error:.1%} is "
            "above the bound; nothing was saved. Profile again on a quiet machine.",
            file=sys.stderr,
        )
        return 1
    path = profile_path(engine)
    report.model.save(path)
    print(f"\nsaved to {path}")
    return 0


def _profile_check(args: argparse.Namespace, engine) -> int:
    """`conserve profile --check`: 0 within the bound, 1 above it, 2 no profile to check."""
    from conserve.engine.profiler import (
        MAX_HELDOUT_ERROR,
        cached_profile,
        check_profile,
        load_profile,
        profile_path,
    )

    where = engine.config.latency_profile
    if where == "auto":
        model, source = cached_profile(engine), str(profile_path(engine))
    else:
        try:
            model, source = load_profile(engine, where), where  # warns if made elsewhere
        except (ValueError, KeyError, TypeError, OSError) as e:
            print(f"conserve: error: cannot read latency profile {where}: {e}", file=sys.stderr)
            return 2
    if model is None:
        print(
            f"conserve: no latency profile to check (none cached at {source}); "
            "`conserve profile` measures one.",
            file=sys.stderr,
        )
        return 2
    bound = MAX_HELDOUT_ERROR if args.max_error is None else args.max_error
    report = check_profile(engine, model, reps=args.reps, count=args.heldout_count, bound=bound)
    print(f"# Latency profile check\n\nprofile: {source}\n")
    print(report.markdown())
    return 0 if report.within_bound else 1


def cmd_batch_run(args: argparse.Namespace) -> int:
    from conserve.batch.run_file import run_batch_file

    return run_batch_file(args, _engine_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conserve",
        description="Co-serving LLM engine: online requests keep their latency, offline work "
        "takes every idle cycle.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_serve(sub)
    _add_profile(sub)
    _add_batch(sub)
    _add_bench(sub)
    return parser


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text for a few prompts and print it")
    EngineArgs.add_cli_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--sampling-seed", type=int, help="seed for reproducible sampling")
    gen.set_defaults(func=cmd_generate)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from conserve.batch.run_file import add_batch_order_args
    from conserve.cluster.args import add_cluster_args

    serve = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve the model over the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /v1/files, /v1/batches). Requests are online unless they set service_tier "
        "'flex' or priority > 0; batch lines are offline.",
    )
    EngineArgs.add_cli_args(serve, policy="conserve")
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
        "--no-engine-restart",
        action="store_true",
        help="when the engine core process dies, stay down (/health 503) instead of starting "
        "a new one (by default it restarts, pausing 1 s, 2 s, ... up to 60 s between repeated "
        "failures; unfinished batches resume)",
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
    add_batch_order_args(serve)
    add_cluster_args(serve)
    serve.set_defaults(func=cmd_serve)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from conserve.engine.profiler import HELDOUT_COUNT, MAX_HELDOUT_ERROR, MIN_REPS

    prof = sub.add_parser(
        "profile",
        help="measure step latency over batch shapes and fit the latency model (or --check it)",
        description="Measure the engine's step time over a grid of batch shapes (decode "
        "batches, prompt chunks, and the mixed steps co-serving runs), fit the latency model "
        "that the conserve policy plans with, and report its error on held-out shapes. Each "
        "shape runs several times and keeps its fastest run. A machine too busy to measure "
        "(runs that disagree, a reference step that drifts) is measured again, then refused; "
        f"a profile whose held-out median error is above {MAX_HELDOUT_ERROR:.0%} is refused "
        "too. Refused: exit status 1, nothing saved. Accepted: cached per model, dtype, "
        "device (CPU model or GPU name), threads and compute path (the compiled kernels' build, "
        "--attention, --layers), where `serve` finds it "
        "(docs/latency-profile.md).",
    )
    EngineArgs.add_cli_args(prof)
    prof.add_argument(
        "--reps",
        type=_at_least(MIN_REPS),
        default=MIN_REPS,
        help=f"timed runs per shape; the fastest is kept (at least {MIN_REPS})",
    )
    prof.add_argument("--output", help="also write a report under this directory")
    prof.add_argument(
        "--check",
        action="store_true",
        help="measure nothing into the cache: load the profile the engine would use (the "
        "cached one, or --latency-profile FILE), time fresh held-out shapes now and print "
        "measured against predicted per shape, the median and p90 error and the verdict; "
        "exit status 0 within the bound, 1 above it, 2 when there is no profile to check",
    )
    prof.add_argument(
        "--max-error",
        type=float,
        metavar="FRACTION",
        help=f"with --check: the median relative error to judge against (default "
        f"{MAX_HELDOUT_ERROR}, the bound a profile must meet to be cached)",
    )
    # for tests: fewer held-out shapes
    prof.add_argument("--heldout-count", type=int, default=HELDOUT_COUNT, help=argparse.SUPPRESS)
    prof.set_defaults(func=cmd_profile)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    return parse


def _add_batch(sub: argparse._SubParsersAction) -> None:
    from conserve.batch.run_file import add_batch_run_args

    batch = sub.add_parser("batch", help="offline batch jobs")
    batch_sub = batch.add_subparsers(dest="batch", required=True)
    br = batch_sub.add_parser(
        "run",
        help="run an OpenAI batch input file without a server (resumable)",
        description="Run every line of an OpenAI Batch API input file (JSONL; url "
        "/v1/chat/completions or /v1/completions) and append OpenAI batch output lines. "
        "Rerunning with the same output file skips the custom_ids already done.",
    )
    add_batch_run_args(br)
    EngineArgs.add_cli_args(br)
    br.set_defaults(func=cmd_batch_run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """`conserve bench <name>` for every row of the benchmark table."""
    from conserve.bench.registry import BENCHES

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for b in BENCHES:
        p = bench_sub.add_parser(b.name, help=b.help, description=b.description)
        if b.engine_args:
            EngineArgs.add_cli_args(p)
        b.add_args(p)
        p.set_defaults(func=b.run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for results files
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ModelNotFoundError, UnsupportedModelError, ConfigError) as e:
        print(f"conserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
