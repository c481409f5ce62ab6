"""`conserve bench offline`: one mixed batch job run in each batch order (fcfs, dfs, blend).

The default job concatenates three tasks the way a user concatenates datasets into one batch
file: all few-shot exam questions (sharing 4 long prefixes, 1-4 output tokens), then all long
documents to summarize (700-1200 prompt tokens, 8-24 output tokens), then all short prompts
with long generations (24-96 prompt tokens, 128-256 output tokens); shuffled within each task.
`--tasks` adds "doc-qa" (six questions about each of many long documents) and `--arrange
shuffled` mixes all lines. Lines are /v1/completions bodies with token-id prompts, ignore_eos
and min_tokens = max_tokens, so every order computes exactly the same tokens.

Each order runs through the path of `conserve batch run`: a fresh engine core behind
`EngineClient`, lines answered by the endpoints' code (`line_executor`), `BatchRunner` with the
order's hook and a window of --window lines (default --max-num-seqs), results appended to a
result file. Reported per run: wall time of the runner, total (prompt + output) tokens/s, the
engine's prefix-cache hit rate (prompt tokens found in the cache / prompt tokens looked up, as
/metrics counts them), engine steps and busy time, and the ceiling of what any order could
save on that run (`order_headroom`). With --repeat the orders run in rotated rounds and the
ratios compare each order's fastest run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from conserve.bench.common import (
    OFFLINE_TASKS,
    machine_info,
    offline_task_request,
    write_results,
)
from conserve.tables import md_table

TASK_ORDER = ("few-shot", "summary", "generation")  # the default tasks, concatenated so
assert set(TASK_ORDER) == set(OFFLINE_TASKS)
# "doc-qa": several questions about one long document (a prefix shared by a few lines each,
# across many documents: what a prefix-aware order keeps together and file order may not)
TASKS = (*TASK_ORDER, "doc-qa")
QUESTIONS_PER_DOC = 6
ARRANGEMENTS = ("concatenated", "shuffled")


def add_offline_args(p: argparse.ArgumentParser) -> None:
    from conserve.batch.planner import ORDERS

    g = p.add_argument_group("offline job")
    g.add_argument("--num-requests", type=int, default=600, help="lines in the job")
    g.add_argument(
        "--order",
        default=",".join(ORDERS),
        help=f"batch orders to run, comma-separated, from {', '.join(ORDERS)}, or "
        "blend-inflight (blend whose dual scan balances the lines in flight instead of all "
        "lines emitted so far: an ablation)",
    )
    g.add_argument(
        "--tasks",
        default=",".join(TASK_ORDER),
        help=f"tasks in the job, comma-separated, from {', '.join(TASKS)}; the lines are "
        "split evenly between them",
    )
    g.add_argument(
        "--arrange",
        choices=ARRANGEMENTS,
        default="concatenated",
        help="concatenated: the tasks one after the other, as a user concatenates datasets; "
        "shuffled: every line at a random place",
    )
    g.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each order; each round rotates which order goes first, and the ratios "
        "compare each order's fastest run (run-to-run noise on a shared machine is several "
        "percent)",
    )
    g.add_argument(
        "--window", type=int, help="lines in flight (default: --max-num-seqs per replica)"
    )
    g.add_argument("--output", default="benchmarks/results", help="results directory")
    from conserve.cluster.args import add_cluster_args

    add_cluster_args(p)
    # a CPU-sized default: with 256 seats the whole window is one engine queue
    p.set_defaults(max_num_seqs=32)


def task_requests(
    kind: str, count: int, rng: random.Random, maker, shots: list[list[int]]
) -> list[tuple[list[int], int]]:
    """`count` (prompt ids, output tokens) of one task. "doc-qa": documents of 600-900 tokens,
    QUESTIONS_PER_DOC questions of 20-40 tokens about each, answered in 16-48 tokens."""
    if kind != "doc-qa":
        return [offline_task_request(kind, rng, maker, shots) for _ in range(count)]
    docs = [maker.ids(rng.randint(600, 900)) for _ in range(-(-count // QUESTIONS_PER_DOC))]
    return [
        (docs[i // QUESTIONS_PER_DOC] + maker.ids(rng.randint(20, 40)), rng.randint(16, 48))
        for i in range(count)
    ]


def build_job(
    n: int,
    tokenizer,
    model: str,
    seed: int,
    tasks: tuple[str, ...] = TASK_ORDER,
    arrange: str = "concatenated",
) -> tuple[list[dict[str, Any]], dict]:
    """Batch input lines (as dicts) of the mixed job: the tasks one after the other (each
    shuffled within) or all lines shuffled."""
    from conserve.bench.serve import PromptMaker

    maker = PromptMaker(tokenizer, seed)
    rng = random.Random(seed + 17)
    shots = [maker.ids(600) for _ in range(4)]
    counts = {k: n // len(tasks) + (1 if i < n % len(tasks) else 0) for i, k in enumerate(tasks)}
    lines: list[dict[str, Any]] = []
    for kind in tasks:
        task = task_requests(kind, counts[kind], rng, maker, shots)
        rng.shuffle(task)
        for i, (prompt, out) in enumerate(task):
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": out,
                "min_tokens": out,
                "ignore_eos": True,
                "temperature": 0,
            }
            url = "/v1/completions"
            lines.append({"custom_id": f"{kind}-{i}", "method": "POST", "url": url, "body": body})
    if arrange == "shuffled":
        rng.shuffle(lines)
        how = "shuffled together"
    else:
        how = "concatenated: " + ", then ".join(tasks) + " (shuffled within a task)"
    prompt_tokens = sum(len(x["body"]["prompt"]) for x in lines)
    output_tokens = sum(x["body"]["max_tokens"] for x in lines)
    desc = {
        "num_requests": len(lines),
        "tasks": counts,
        "arrange": arrange,
        "task_order": how,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "max_output_tokens": max(x["body"]["max_tokens"] for x in lines),
    }
    return lines, desc


async def _run_order(
    args, config, order: str, job_path: Path, out_dir: Path, tag: str = ""
) -> tuple[dict[str, Any], int]:
    """One run of the job in `order` on a fresh engine core: its figures, and the engine's KV
    blocks."""
    from conserve.batch.execute import batch_order, line_executor
    from conserve.batch.results import ResultFiles
    from conserve.batch.runner import BatchRunner
    from conserve.batch.validate import parse_input
    from conserve.cluster.args import make_client
    from conserve.server.state import ServerState

    parsed = parse_input(job_path.read_bytes(), endpoint=None)
    assert not parsed.errors, parsed.errors[:3]
    client = make_client(config, args)
    client.start(asyncio.get_running_loop())
    try:
        execute = line_executor(ServerState(), client)
        await _warm_up(execute, client)
        before = await client.stats()
        out = out_dir / f"{order}{tag}.jsonl"  # a fresh result file: nothing is done yet
        results = ResultFiles(out, out)
        runner = BatchRunner(
            parsed.lines,
            results,
            execute,
            order=batch_order(client, order),
            window=args.window or config.scheduler.max_num_seqs * client.num_replicas,
        )
        status, wall, steps = await _timed_run(runner, client)
        after = await client.stats()
        steps += after.step_times
        c = results.counts
        results.close()
    finally:
        client.shutdown()
    result = _order_result(order, status, c, wall, before, after, steps, runner.max_in_flight)
    return result, client.num_kv_blocks


async def _timed_run(runner, client) -> tuple[str, float, list[float]]:
    """The batch runner to its end, collecting step times meanwhile: (status, wall seconds,
    step times so far)."""
    start = time.monotonic()
    steps: list[float] = []
    done = asyncio.Event()
    poller = asyncio.create_task(_collect_step_times(client, steps, done))
    try:
        status = await runner.run()
    finally:
        done.set()
        await poller
    return status, time.monotonic() - start, steps


def _order_result(
    order: str,
    status: str,
    c,
    wall: float,
    before,
    after,
    steps: list[float],
    max_in_flight: int,
) -> dict[str, Any]:
    """One run's figures: result-file counts `c`, engine stats `before` and `after` the run."""
    queries = after.prefix_queries - before.prefix_queries
    hits = after.prefix_hits - before.prefix_hits
    return {
        "order": order,
        "status": status,
        "completed": c.completed,
        "failed": c.failed,
        "wall_s": wall,
        "prompt_tokens": c.input_tokens,
        "output_tokens": c.output_tokens,
        "tokens_per_s": (c.input_tokens + c.output_tokens) / wall,
        "prefix_queries": queries,
        "prefix_hits": hits,
        "prefix_hit_rate": hits / queries if queries else 0.0,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "shared_prefix_waits": after.shared_prefix_waits - before.shared_prefix_waits,
        "max_in_flight": max_in_flight,
        "steps": len(steps),
        "busy_s": sum(steps),
    }


async def _collect_step_times(
    client, into: list[float], done: asyncio.Event, every_s: float = 5.0
) -> None:
    """Step times from the engine's stats every few seconds until `done`, and once more then
    (each call hands over the steps since the previous one; the engine keeps its last 10,000)."""
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)
        into += (await client.stats()).step_times


async def _warm_up(execute, client) -> None:
    """Two tiny requests so the first timed step does not pay one-off start-up costs."""
    from conserve.batch.validate import BatchLine

    body = {"model": client.model_name, "prompt": [300, 301, 302], "max_tokens": 2}
    await asyncio.gather(
        *(execute(BatchLine(0, f"warm{i}", "/v1/completions", body)) for i in (0, 1))
    )


def order_headroom(run: dict, desc: dict, seats: int, budget: int, fixed_s: float) -> dict:
    """The most any order of the job could speed up `run`, holding its prefix-cache hits.

    Under the engine's latency model a step costs a fixed part plus parts per token, per
    sequence and per attended key; an order changes how the tokens are grouped into steps,
    not how many are computed nor the context each attends. So an order can save at most the
    fixed cost of the steps it avoids. No order runs fewer steps than the largest of:
    - output tokens / seats: a request holds a seat for at least one step per output token;
    - computed tokens / --max-num-batched-tokens, computed tokens being the prompt tokens not
      found in the cache plus all output tokens but each request's last;
    - the longest output: one token per step.
    `fixed_s` is the per-step cost counted as saveable: the latency profile's fixed part plus
    this run's time between steps (wall minus busy) per step, so the ceiling is generous."""
    computed = run["prompt_tokens"] - run["prefix_hits"] + run["output_tokens"] - run["completed"]
    bounds = {
        "seats": math.ceil(run["output_tokens"] / seats),
        "tokens": math.ceil(computed / budget),
        "longest output": desc["max_output_tokens"],
    }
    least = max(bounds.values())
    per_step = fixed_s + max(0.0, run["wall_s"] - run["busy_s"]) / max(1, run["steps"])
    saveable = per_step * max(0, run["steps"] - least)
    return {
        "step_bounds": bounds,
        "least_steps": least,
        "binding": max(bounds, key=bounds.get),
        "per_step_s": per_step,
        "saveable_s": saveable,
        "max_speedup": run["wall_s"] / (run["wall_s"] - saveable),
    }


def latency_profile(config) -> dict[str, float]:
    """The coefficients of this engine's latency profile by feature (seconds per unit; "const"
    is the fixed part of a step). The profile is the one cached for this model, dtype, device
    and threads, measured now (about a minute) if there is none; a throwaway engine with a
    small KV pool finds it (the profile does not depend on the pool)."""
    from dataclasses import replace

    from conserve.engine.engine import Engine
    from conserve.engine.latency import FEATURES
    from conserve.engine.profiler import load_or_build

    small = replace(config, cache=replace(config.cache, num_blocks=64, kv_cache_gb=None))
    coef = load_or_build(Engine.from_config(small)).coef
    return {f: float(c) for f, c in zip(FEATURES, coef, strict=True)}


def _row(r: dict) -> list:
    h = r["headroom"]
    return [
        r["order"] if "round" not in r else f"{r['order']} (round {r['round']})",
        f"{r['wall_s']:.1f}",
        f"{r['tokens_per_s']:.0f}",
        f"{100 * r['prefix_hit_rate']:.1f}% ({r['prefix_hits']}/{r['prefix_queries']})",
        r["preemptions"],
        f"{r['completed']}/{r['completed'] + r['failed']}",
        f"{r['steps']} ({h['least_steps']}, {h['binding']})",
        f"{r['busy_s']:.1f}",
        f"{h['saveable_s']:.1f} s, {h['max_speedup']:.3f}x",
    ]


HEADERS = [
    "order",
    "wall s",
    "tokens/s (prompt+output)",
    "prefix-cache hits",
    "preempt",
    "ok",
    "steps (fewest any order, bound)",
    "busy s",
    "most any order can save",
]


def render(runs: list[dict], best: list[dict], desc: dict, info: dict, ratios: dict, config):
    sc = config.scheduler
    tasks = ", ".join(f"{k} {v}" for k, v in desc["tasks"].items())
    lines = [
        "# Offline batch order: fcfs vs dfs vs blend",
        "",
        f"- date: {info['date']}; machine: {info['cpu']}, {info['cores']} cores; "
        f"torch {info['torch']}",
        f"- command: `{info['command']}`",
        f"- engine: model {config.model}, dtype {config.dtype}, max_num_seqs {sc.max_num_seqs}, "
        f"max_num_batched_tokens {sc.max_num_batched_tokens}, policy {sc.policy}, "
        f"window {desc['window']}, KV cache {desc['kv_blocks']} blocks of "
        f"{config.cache.block_size} tokens"
        + (f" per replica, {desc['replicas']} replicas on Ray" if desc["replicas"] > 1 else ""),
        f"- job: {desc['num_requests']} lines ({tasks}), "
        f"{desc['prompt_tokens']} prompt + {desc['output_tokens']} output tokens; the tasks are "
        f"{desc['task_order']}",
        "- each order: a fresh engine, the `conserve batch run` path (engine core, "
        "BatchRunner, endpoint code); output lengths exact (ignore_eos, min_tokens)",
        "",
        md_table(HEADERS, [_row(r) for r in runs]),
        "",
    ]
    if len(best) < len(runs):
        lines += [
            f"Fastest run of each order ({desc['repeat']} rounds, each starting with a "
            "different order), which the ratios compare:",
            "",
            md_table(HEADERS, [_row(r) for r in best]),
            "",
        ]
    lines += [f"- {k}: {v:.3f}" for k, v in ratios.items()]
    lines += [
        "",
        "How much order can matter here: a step costs a fixed part (here "
        f"{1000 * desc['fixed_step_s']:.1f} ms, the latency profile's constant) plus parts per "
        "token, sequence and attended key that no order changes (at equal prefix hits). An "
        "order saves at most the fixed part, plus the time between steps, of each step it "
        "avoids, and no order runs fewer steps than output tokens / seats, computed tokens / "
        "token budget, or the longest output. 'most any order can save' is that ceiling for "
        "each run.",
    ]
    return "\n".join(lines) + "\n"


def best_runs(runs: list[dict]) -> list[dict]:
    """Per order (first-run order kept), its fastest run: on a shared machine the least
    disturbed one (run-to-run spread here is several percent)."""
    by: dict[str, dict] = {}
    for r in runs:
        if r["order"] not in by or r["tokens_per_s"] > by[r["order"]]["tokens_per_s"]:
            by[r["order"]] = r
    return list(by.values())


def ratios_of(runs: list[dict]) -> dict[str, float]:
    """blend (and blend-inflight) against fcfs and dfs: throughput and prefix-cache hits.
    `runs` holds one run per order (use `best_runs` first)."""
    by = {r["order"]: r for r in runs}
    out: dict[str, float] = {}
    for name in ("blend", "blend-inflight"):
        b = by.get(name)
        for base in ("fcfs", "dfs"):
            if b is None or base not in by:
                continue
            out[f"throughput {name}/{base}"] = b["tokens_per_s"] / by[base]["tokens_per_s"]
            if by[base]["prefix_hits"]:
                out[f"prefix hits {name}/{base}"] = b["prefix_hits"] / by[base]["prefix_hits"]
    return out


def rounds(orders: list[str], repeat: int) -> list[list[str]]:
    """The orders of each round, rotated so that each order goes first in turn (the first
    engine of an invocation can run a few percent slower or faster than the rest)."""
    return [orders[i % len(orders) :] + orders[: i % len(orders)] for i in range(repeat)]


def run_offline_bench(args: argparse.Namespace) -> int:
    from conserve.engine_args import engine_config
    from conserve.model.loader import resolve_model
    from conserve.model.tokenizer import Tokenizer

    checked = _orders_and_tasks(args)
    if checked is None:
        return 2
    orders, tasks = checked
    config = engine_config(args).resolved()
    info = machine_info()
    tokenizer = Tokenizer.load(resolve_model(config.model))
    profile = latency_profile(config)
    with tempfile.TemporaryDirectory(prefix="conserve-offline-") as tmp:
        tmp_dir = Path(tmp)
        model_name = _served_name(config)
        job, desc = build_job(
            args.num_requests, tokenizer, model_name, args.seed, tasks, args.arrange
        )
        desc["window"] = args.window or config.scheduler.max_num_seqs * args.replicas
        desc["replicas"] = args.replicas
        desc["fixed_step_s"] = profile["const"]
        desc["latency_profile"] = profile
        desc["kv_blocks"] = None  # the engine's, once one has started
        desc["repeat"] = args.repeat
        job_path = tmp_dir / "job.jsonl"
        job_path.write_text("".join(json.dumps(x) + "\n" for x in job))
        runs = _run_rounds(args, config, orders, job_path, desc)
    best = best_runs(runs)
    ratios = ratios_of(best)
    md = render(runs, best, desc, info, ratios, config)
    data = {"machine": info, "job": desc, "runs": runs, "ratios": ratios}
    path = write_results(args.output, "offline", md, data)
    print(md)
    print(f"results: {path}")
    return 0


def _orders_and_tasks(args: argparse.Namespace) -> tuple[list[str], tuple[str, ...]] | None:
    """The orders and tasks asked for, or None (after an error message) when one is unknown."""
    from conserve.batch.planner import ORDERS

    orders = [o.strip() for o in args.order.split(",") if o.strip()]
    bad = [o for o in orders if o not in (*ORDERS, "blend-inflight")]
    if bad:
        print(f"conserve: error: unknown order(s) {', '.join(bad)}; choose from {ORDERS}")
        return None
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        print(f"conserve: error: unknown task(s) {', '.join(bad)}; choose from {TASKS}")
        return None
    if args.repeat < 1:
        print("conserve: error: --repeat must be at least 1")
        return None
    return orders, tasks


def _run_rounds(
    args: argparse.Namespace, config, orders: list[str], job_path: Path, desc: dict
) -> list[dict]:
    """Every order, --repeat rounds of them, each on a fresh engine."""
    sc = config.scheduler
    runs = []
    for i, names in enumerate(rounds(orders, args.repeat)):
        for order in names:
            r, desc["kv_blocks"] = asyncio.run(
                _run_order(args, config, order, job_path, job_path.parent, f"-{i}")
            )
            r["headroom"] = order_headroom(
                r, desc, sc.max_num_seqs, sc.max_num_batched_tokens, desc["fixed_step_s"]
            )
            if args.repeat > 1:
                r["round"] = i + 1
            print(
                f"{order}: {r['wall_s']:.1f} s, {r['tokens_per_s']:.0f} tok/s, "
                f"prefix hits {100 * r['prefix_hit_rate']:.1f}%",
                flush=True,
            )
            runs.append(r)
    return runs


def _served_name(config) -> str:
    """The model name the engine answers to (what a batch line's `model` must say)."""
    from conserve.model.loader import resolve_model

    return resolve_model(config.model).name
