"""`conserve batch run`: a batch input file run without a server, resumable.

The same pieces as the server's Batch API: `parse_input` checks the file, the engine core runs
in its own process behind `EngineClient`, each line is answered by the HTTP endpoints' code
(`line_executor`), and `BatchRunner` appends results durably. Rerunning with the same output
file skips every custom_id already in the output or error file (after cutting a torn last line).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from conserve.batch.planner import DEFAULT_ORDER, ORDERS
from conserve.batch.results import LineResult, ResultFiles, usage_of
from conserve.batch.runner import BatchRunner, EngineGone
from conserve.batch.validate import parse_input
from conserve.cluster.args import add_cluster_args


def add_batch_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="batch input file (OpenAI Batch API JSONL)")
    p.add_argument("-o", "--output", required=True, help="output file (JSONL), appended to")
    p.add_argument(
        "--errors",
        help="error file (JSONL) for lines answered with an error (default: the output file)",
    )
    p.add_argument(
        "--window",
        type=int,
        help="lines in flight at once (default: --max-num-seqs per replica, so that the batch "
        "order, not the engine's queue, decides what runs next)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_batch_order_args(p)
    add_cluster_args(p)


def add_batch_order_args(p: argparse.ArgumentParser) -> None:
    """--batch-order and the planner's device figures (`batch run` and `serve`)."""
    g = p.add_argument_group("batch order")
    g.add_argument(
        "--batch-order",
        choices=ORDERS,
        default=DEFAULT_ORDER,
        help="order in which batch lines enter the engine: fcfs (file order), dfs (depth "
        "first over the prompts' prefix tree: lines sharing a prefix run together), blend "
        "(BlendServe: the prefix tree sorted by compute density, compute-heavy and "
        "memory-heavy lines admitted together at the job's overall density; output lengths "
        f"from max_tokens, or measured on a 1%% sample first). Default: {DEFAULT_ORDER}",
    )
    g.add_argument(
        "--planner-tflops",
        type=float,
        help="peak matmul TFLOP/s the planner states densities in (default: per device; "
        "the order does not depend on it)",
    )
    g.add_argument(
        "--planner-gbs",
        type=float,
        help="memory bandwidth GB/s the planner states densities in (default: per device)",
    )


def run_batch_file(args: argparse.Namespace, config) -> int:
    source = Path(args.input)
    if not source.is_file():
        print(f"conserve: error: input file not found: {source}", file=sys.stderr)
        return 2
    parsed = parse_input(source.read_bytes(), endpoint=None)
    if parsed.errors:
        print(f"conserve: error: {source} is not a valid batch file:", file=sys.stderr)
        for e in parsed.errors[:20]:
            print(f"  {e.code}: {e.message}", file=sys.stderr)
        return 1
    output = Path(args.output)
    results = ResultFiles(output, Path(args.errors) if args.errors else output)
    try:
        ids = {line.custom_id for line in parsed.lines}
        done = len(ids & results.done)
        if done == len(ids):
            print(f"all {done} lines already have results in {output}", file=sys.stderr)
            return 0
        if done:
            print(f"resuming: {done} of {len(ids)} lines already done", file=sys.stderr)
        return asyncio.run(_run(args, config, parsed.lines, results, done))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        results.close()


async def _run(args, config, lines, results: ResultFiles, done: int) -> int:
    from tqdm import tqdm

    from conserve.batch.execute import batch_order, line_executor
    from conserve.cluster.args import make_client

    client = make_client(config, args)
    client.start(asyncio.get_running_loop())
    bar = tqdm(
        total=len(lines), initial=done, unit="line", disable=args.no_progress, dynamic_ncols=True
    )
    start, tokens = time.monotonic(), 0

    def progress(batch: list[LineResult]) -> None:
        nonlocal tokens
        for r in batch:
            if r.ok:
                prompt, _, completion = usage_of(r.to_line())
                tokens += prompt + completion
        bar.update(len(batch))
        bar.set_postfix_str(f"{tokens / max(time.monotonic() - start, 1e-6):.0f} tok/s")

    runner = BatchRunner(
        lines,
        results,
        line_executor(None, client),
        order=batch_order(client, args.batch_order, args.planner_tflops, args.planner_gbs),
        window=args.window or config.scheduler.max_num_seqs * client.num_replicas,
        on_results=progress,
    )
    try:
        await runner.run()
    except EngineGone as e:
        print(f"conserve: error: the engine stopped: {e}; rerun to resume", file=sys.stderr)
        return 1
    finally:
        bar.close()
        client.shutdown()
    c = results.counts
    print(
        f"{c.completed} completed, {c.failed} failed ({runner.started} run now); "
        f"output: {results.output}"
        + (f", errors: {results.errors}" if results.errors != results.output else ""),
        file=sys.stderr,
    )
    return 0
