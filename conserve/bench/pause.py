"""`conserve bench pause`: offline requests paused by memory pressure, resumed from the host
tier (incremental checkpoints) against recomputed (no host tier), on two engines in this
process that differ only in `host_kv_gb` (policy conserve, prefix caching off so that a
resumed request cannot lean on blocks that happened to stay cached).

1. Resume cost per context length: an offline request of L prompt tokens generates a few
   tokens, then an online request that needs more blocks than are free pauses it; once the
   online request is done the offline one resumes. Measured: the wall time of the engine steps
   from its re-admission until its next token (restore copy + the recomputed tail, or the
   whole recompute), and the scheduler's counters.
2. Throughput under memory pressure: an offline job in a small KV pool with a seeded stream of
   online requests arriving in wall-clock time until the job is done; offline tokens/s with
   each engine, and the time spent copying checkpoints to the host tier (the incremental
   copies after every step).

Everything is read from `Engine.stats()` (counter deltas) and the steps' outputs.

Every paused offline request's greedy tokens are compared with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from dataclasses import replace
from typing import Any

from conserve.bench.common import (
    distribution,
    info_lines,
    machine_info,
    random_prompt,
    write_results,
)
from conserve.engine.engine import Engine
from conserve.engine.request import RequestClass
from conserve.engine_args import engine_config
from conserve.sampling.params import SamplingParams
from conserve.tables import md_table

MODES = ("host tier", "recompute")


def add_pause_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pause benchmark")
    g.add_argument("--contexts", default="256,512,1024,2048", help="offline prompt lengths")
    g.add_argument("--generated", type=int, default=16, help="tokens generated before the pause")
    g.add_argument("--after", type=int, default=4, help="tokens generated after the resume")
    g.add_argument("--job-requests", type=int, default=8, help="offline job (part 2)")
    g.add_argument("--job-prompt-len", type=int, default=512, help="+-25%%")
    g.add_argument("--job-output-len", type=int, default=32)
    g.add_argument("--job-pool-blocks", type=int, default=96, help="KV pool of part 2")
    g.add_argument("--online-interval", type=float, default=0.5, help="mean seconds (Poisson)")
    g.add_argument("--online-prompt-len", type=int, default=256)
    g.add_argument("--online-output-len", type=int, default=8)
    g.add_argument("--repeats", type=int, default=2, help="runs per mode, order alternating")
    g.add_argument("--bench-seed", type=int, default=0)
    g.add_argument("--output", default="benchmarks/results", help="results directory")


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def build_engine(args: argparse.Namespace, host: bool, num_blocks: int, budget: int) -> Engine:
    cfg = engine_config(args)
    sched = replace(
        cfg.scheduler,
        policy="conserve",
        max_num_batched_tokens=max(cfg.scheduler.max_num_batched_tokens, budget),
    )
    cache = replace(
        cfg.cache,
        num_blocks=num_blocks,
        enable_prefix_caching=False,
        host_kv_gb=cfg.cache.host_kv_gb if host else 0.0,
        # checkpoints after every step, whatever is free: the mechanism is what is measured
        # (part 1 pauses a request in a pool with room to spare)
        host_kv_checkpoint_free=1.0,
    )
    engine = Engine.from_config(replace(cfg, scheduler=sched, cache=cache))
    if host and engine.stats().host is None:
        raise SystemExit("the host tier is off: give --host-kv-gb > 0")
    return engine


class Counters:
    """Deltas of the engine's preemption, host-tier and step counters (`Engine.stats()`)
    since `mark()`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.mark()

    def snapshot(self) -> dict[str, float]:
        st = self.engine.stats()
        h = st.host
        return {
            "offline_preemptions": st.preemptions_by_class[RequestClass.OFFLINE.value],
            "online_preemptions": st.preemptions_by_class[RequestClass.ONLINE.value],
            "pauses": st.num_pauses,
            "tokens_restored": st.tokens_restored,
            "tokens_recomputed": st.tokens_recomputed,
            "blocks_checkpointed": h.blocks_checkpointed if h else 0,
            "blocks_restored": h.blocks_restored if h else 0,
            "restore_copy_s": h.restore_s if h else 0.0,
            "checkpoint_s": h.checkpoint_s if h else 0.0,
            # the engine runs its checkpoint pass after every step that ran to its end
            "checkpoint_calls": st.num_steps,
            "steps": st.num_steps,
        }

    def mark(self) -> None:
        self._base = self.snapshot()
        self._busy = self.engine.stats().busy_s

    def delta(self) -> dict[str, float]:
        now = self.snapshot()
        return {k: now[k] - self._base[k] for k in now}

    def busy_s(self) -> float:
        """Seconds the engine's steps computed since `mark()`."""
        return self.engine.stats().busy_s - self._busy


class Progress:
    """Each request's tokens so far and which requests finished, from the outputs of the
    steps it takes (`step()` runs one engine step)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}
        self.finished: set[str] = set()

    def step(self) -> None:
        for out in self.engine.step():
            self.tokens[out.request_id] = list(out.outputs[0].token_ids)
            if out.finished:
                self.finished.add(out.request_id)

    def count(self, request_id: str) -> int:
        return len(self.tokens.get(request_id, ()))


def agreeing(a: list[int], b: list[int]) -> int:
    """Leading tokens on which a and b agree."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def run_alone(engine: Engine, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """Greedy tokens of the prompts run together with nothing else (the reference)."""
    ids = [f"ref-{engine.stats().num_steps}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(rid, p, greedy(output_len), RequestClass.OFFLINE)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    engine.check_integrity()
    return [done[r] for r in ids]


# -- part 1: resume cost per context length ---------------------------------------------------


def pause_and_resume(
    engine: Engine,
    counters: Counters,
    prompt: list[int],
    generated: int,
    after: int,
    rng: random.Random,
) -> dict[str, Any]:
    bs = engine.config.cache.block_size
    rid = f"ctx{len(prompt)}-{engine.stats().num_steps}"
    engine.add_request(rid, prompt, greedy(generated + after), RequestClass.OFFLINE)
    p = Progress(engine)
    while p.count(rid) < generated:
        p.step()
    # an online request that needs one block more than is free: it pauses the offline one
    free = engine.stats().kv.free_blocks
    online = random_prompt(rng, (free + 1) * bs, engine.tokenizer.vocab_size)
    counters.mark()
    engine.add_request(f"{rid}-on", online, greedy(1), RequestClass.ONLINE)
    while f"{rid}-on" not in p.finished:
        p.step()
    # preempted, and waiting (not running) now that the online request is done
    paused = counters.delta()["offline_preemptions"] > 0 and not engine.stats().running
    context = len(prompt) + p.count(rid)
    before = p.count(rid)
    resume_steps = 0
    t0 = time.perf_counter()
    while p.count(rid) == before:
        p.step()
        resume_steps += 1
    resume_s = time.perf_counter() - t0
    c = counters.delta()
    while engine.has_unfinished():
        p.step()
    engine.check_integrity()
    return {
        "prompt_len": len(prompt),
        "context_at_pause": context,
        "online_prompt_len": len(online),
        "paused": paused,
        "resume_ms": resume_s * 1e3,
        "resume_steps": resume_steps,
        "restore_copy_ms": c["restore_copy_s"] * 1e3,
        "tokens_restored": c["tokens_restored"],
        "tokens_recomputed": c["tokens_recomputed"],
        "blocks_restored": c["blocks_restored"],
        "pauses": c["pauses"],
        "tokens": p.tokens[rid] if rid in p.finished else None,
    }


def resume_part(
    args: argparse.Namespace, contexts: list[int], rng: random.Random
) -> tuple[dict[str, Any], int]:
    """Part 1 on two engines whose pool just fits the longest context; returns its results
    and the vocabulary size."""
    bs = args.block_size
    longest = max(contexts) + args.generated + args.after
    pool = -(-longest // bs) + 2
    budget = longest + bs
    engines = {m: build_engine(args, m == "host tier", pool, budget) for m in MODES}
    counters = {m: Counters(e) for m, e in engines.items()}
    vocab = engines["host tier"].tokenizer.vocab_size
    prompts = {n: random_prompt(rng, n, vocab) for n in contexts}
    print("[pause] uninterrupted reference runs", flush=True)
    ref = {
        n: run_alone(engines["host tier"], [p], args.generated + args.after)[0]
        for n, p in prompts.items()
    }
    run_alone(engines["recompute"], [prompts[contexts[0]]], 2)  # warm-up
    by_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for n in contexts:
        for m in MODES:
            r = pause_and_resume(
                engines[m], counters[m], prompts[n], args.generated, args.after, rng
            )
            r["tokens_equal"] = r.pop("tokens") == ref[n]
            by_mode[m].append(r)
            print(f"[pause] {m}, context {n}: resume {r['resume_ms']:.0f} ms", flush=True)
    return {"pool_blocks": pool, "generated": args.generated, "by_mode": by_mode}, vocab


# -- part 2: throughput under memory pressure -------------------------------------------------


def pressure_run(
    engine: Engine,
    counters: Counters,
    job: list[list[int]],
    job_output_len: int,
    online: list[tuple[float, list[int]]],
    online_output_len: int,
) -> dict[str, Any]:
    """The offline job from time 0 and online requests at their arrival times, until the job
    is done; the online requests still running then finish after the clock stops."""
    tag = f"p{engine.stats().num_steps}"
    ids = [f"{tag}-off{i}" for i in range(len(job))]
    for rid, p in zip(ids, job, strict=True):
        engine.add_request(rid, p, greedy(job_output_len), RequestClass.OFFLINE)
    counters.mark()
    done: dict[str, list[int]] = {}
    arrivals: dict[str, float] = {}
    ttft: list[float] = []
    nxt = 0
    t0 = time.perf_counter()
    while len(done) < len(job):
        now = time.perf_counter() - t0
        while nxt < len(online) and online[nxt][0] <= now:
            rid = f"{tag}-on{nxt}"
            engine.add_request(rid, online[nxt][1], greedy(online_output_len))
            arrivals[rid] = t0 + online[nxt][0]
            nxt += 1
        for out in engine.step():
            if out.request_id in arrivals and len(out.outputs[0].token_ids) == 1:
                ttft.append((time.perf_counter() - arrivals[out.request_id]) * 1e3)
            if out.finished and out.request_id in ids:
                done[out.request_id] = list(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - t0
    c = counters.delta()
    busy = counters.busy_s()
    while engine.has_unfinished():
        engine.step()
    engine.check_integrity()
    tokens = sum(len(p) for p in job) + len(job) * job_output_len
    return {
        "seconds": elapsed,
        "offline_tok_s": tokens / elapsed,
        "online_requests": nxt,
        "online_ttft_ms": distribution(ttft),
        "step_busy_s": busy,
        "checkpoint_ms_per_step": c["checkpoint_s"] * 1e3 / max(1, c["checkpoint_calls"]),
        "checkpoint_share": c["checkpoint_s"] / elapsed,
        **{k: v for k, v in c.items()},
        "tokens": [done[r] for r in ids],
    }


def online_arrivals(
    args: argparse.Namespace, rng: random.Random, vocab: int, alone_s: float
) -> list[tuple[float, list[int]]]:
    """Poisson arrival times with prompts, for far longer than the job can take."""
    t_on = 0.0
    online = []
    while len(online) < 10_000:
        t_on += rng.expovariate(1 / args.online_interval)
        online.append((t_on, random_prompt(rng, args.online_prompt_len, vocab)))
        if t_on > 50 * alone_s:
            break
    return online


def pressure_part(
    args: argparse.Namespace, rng: random.Random, vocab: int
) -> tuple[dict[str, Any], Engine]:
    """Part 2 on two fresh engines with a small pool (its size is fixed at start-up); returns
    its results and the host-tier engine."""
    lo, hi = args.job_prompt_len * 3 // 4, args.job_prompt_len * 5 // 4
    jobs = [random_prompt(rng, rng.randint(lo, hi), vocab) for _ in range(args.job_requests)]
    budget = max(args.max_num_batched_tokens, max(map(len, jobs)))
    engines = {m: build_engine(args, m == "host tier", args.job_pool_blocks, budget) for m in MODES}
    counters = {m: Counters(e) for m, e in engines.items()}
    for e in engines.values():
        run_alone(e, jobs[:1], 2)  # warm-up
    print("[pause] offline job alone (reference)", flush=True)
    t = time.perf_counter()
    job_ref = run_alone(engines["host tier"], jobs, args.job_output_len)
    alone_s = time.perf_counter() - t
    online = online_arrivals(args, rng, vocab, alone_s)
    by_mode: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(args.repeats):
        for m in MODES if i % 2 == 0 else MODES[::-1]:  # ABBA...: drift hits both alike
            r = pressure_run(
                engines[m], counters[m], jobs, args.job_output_len, online, args.online_output_len
            )
            toks = r.pop("tokens")
            r["tokens_equal"] = sum(a == b for a, b in zip(toks, job_ref, strict=True))
            r["min_agreeing_prefix"] = min(map(agreeing, toks, job_ref))
            by_mode[m].append(r)
            print(f"[pause] {m} under pressure: {r['offline_tok_s']:.0f} tok/s", flush=True)
    for e in engines.values():
        e.check_integrity()
    job_tokens = sum(map(len, jobs)) + len(jobs) * args.job_output_len
    return {
        "pool_blocks": args.job_pool_blocks,
        "job_requests": len(jobs),
        "job_tokens": job_tokens,
        "job_output_len": args.job_output_len,
        "online_interval_s": args.online_interval,
        "online_prompt_len": args.online_prompt_len,
        "online_output_len": args.online_output_len,
        "alone_s": alone_s,
        "alone_offline_tok_s": job_tokens / alone_s,
        "by_mode": by_mode,
        "repeats": args.repeats,
    }, engines["host tier"]


# -- the command ------------------------------------------------------------------------------


def run_pause(args: argparse.Namespace) -> int:
    info = machine_info(args.argv)
    contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    rng = random.Random(args.bench_seed)
    resume, vocab = resume_part(args, contexts, rng)
    gc.collect()  # free the first engines' KV and host tiers before building the next
    pressure, engine = pressure_part(args, rng, vocab)
    data = {
        "machine": info,
        "model": engine.model_name,
        "dtype": engine.config.dtype,
        "block_size": args.block_size,
        "resume": resume,
        "pressure": pressure,
    }
    md = render(data)
    path = write_results(args.output, "pause", md, data)
    print(md)
    print(f"results: {path}")
    return 0


# -- the results file -------------------------------------------------------------------------


def render(d: dict[str, Any]) -> str:
    lines = ["# Memory pressure: host-tier resume against recompute", ""]
    lines += info_lines(d["machine"])
    r = d["resume"]
    lines += [
        f"- model {d['model']}, {d['dtype']}, block size {d['block_size']}, policy conserve, "
        "prefix caching off; two engines, host tier on / off",
        "",
        "## Resume cost per context length",
        "",
        f"KV pool of {r['pool_blocks']} blocks. The offline request generates {r['generated']} "
        "tokens, is paused by an online request needing one block more than is free, and "
        "resumes after it. Resume = the engine steps from its re-admission to its next token.",
        "",
        _resume_table(r["by_mode"]),
    ]
    lines += _pressure_section(d["pressure"])
    return "\n".join(lines) + "\n"


def _resume_table(by_mode: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for h, c in zip(by_mode["host tier"], by_mode["recompute"], strict=True):
        rows.append(
            [
                h["prompt_len"],
                h["context_at_pause"],
                f"{h['resume_ms']:.1f}",
                f"{h['restore_copy_ms']:.2f}",
                h["tokens_restored"],
                h["tokens_recomputed"],
                f"{c['resume_ms']:.1f}",
                c["tokens_recomputed"],
                f"{c['resume_ms'] / h['resume_ms']:.1f}x",
                f"{h['paused'] and c['paused']}",
                f"{h['tokens_equal']}/{c['tokens_equal']}",
            ]
        )
    head = ["prompt", "context", "host: resume ms", "of which copy ms", "restored"]
    head += ["recomputed", "recompute: resume ms", "recomputed", "recompute / host", "paused"]
    head += ["tokens equal (host/rec)"]
    return md_table(head, rows)


def _pressure_section(p: dict[str, Any]) -> list[str]:
    rate = {
        m: p["job_tokens"] * len(r) / sum(x["seconds"] for x in r) for m, r in p["by_mode"].items()
    }
    return [
        "",
        "## Offline throughput under memory pressure",
        "",
        f"Offline job: {p['job_requests']} requests, {p['job_tokens']} tokens (prompt + "
        f"{p['job_output_len']} output each); KV pool of {p['pool_blocks']} blocks; online "
        f"requests of {p['online_prompt_len']} + {p['online_output_len']} tokens, Poisson "
        f"arrivals every {p['online_interval_s']} s on average, until the job is done. The job "
        f"alone (no online requests): {p['alone_s']:.1f} s, {p['alone_offline_tok_s']:.0f} tok/s.",
        "",
        _pressure_table(p),
        "",
        f"Host tier / recompute offline throughput: {rate['host tier'] / rate['recompute']:.2f}x "
        f"({rate['host tier']:.0f} / {rate['recompute']:.0f} tok/s over all runs of each; same "
        "job, same online arrival times, runs alternating). `tokens equal`: offline requests "
        "whose greedy tokens equal the job run alone; in parentheses the fewest leading tokens "
        "on which any request agrees with it.",
    ]


def _pressure_table(p: dict[str, Any]) -> str:
    rows = []
    for m, runs in p["by_mode"].items():
        for i, x in enumerate(runs):
            ttft = x["online_ttft_ms"]
            rows.append(
                [
                    f"{m} #{i + 1}",
                    f"{x['offline_tok_s']:.0f}",
                    f"{x['seconds']:.1f}",
                    x["online_requests"],
                    x["offline_preemptions"],
                    x["pauses"],
                    x["tokens_restored"],
                    x["tokens_recomputed"],
                    x["blocks_checkpointed"],
                    f"{x['checkpoint_ms_per_step']:.2f}",
                    f"{x['checkpoint_share'] * 100:.2f}%",
                    f"{ttft.get('p50', 0):.0f} / {ttft.get('p99', 0):.0f}",
                    f"{x['tokens_equal']}/{p['job_requests']} ({x['min_agreeing_prefix']})",
                ]
            )
    head = ["mode, run", "offline tok/s", "job s", "online reqs", "offline preemptions"]
    head += ["pauses", "tokens restored", "tokens recomputed", "blocks checkpointed"]
    head += ["checkpoint ms/step", "checkpoint share of job time", "online TTFT p50 / p99 ms"]
    head += ["tokens equal (shortest agreeing prefix)"]
    return md_table(head, rows)
