"""Two engines in one process, one with its packed weights and KV cache on huge pages (the
default) and one without (CONSERVE_HUGEPAGES=0 while it is built), their decode steps
alternated step by step on the same requests, per batch size.

    PYTHONPATH=. python benchmarks/diagnostics/hugepages_ab.py [--batches 1,2,4,...] [--steps 40]

Prints per batch size the median step time of each (ms, `step()`: plan, run, apply), the ratio
huge / small, and the AnonHugePages the process holds.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from conserve import LLM
from conserve.sampling.params import SamplingParams


def anon_huge_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--steps", type=int, default=40, help="steps timed per engine and size")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    engines = {}
    for name, flag in (("small", "0"), ("huge", "1")):
        os.environ["CONSERVE_HUGEPAGES"] = flag
        engines[name] = LLM("default", dtype="bfloat16", num_blocks=8192, max_num_seqs=256).engine
        print(f"{name} pages engine built; AnonHugePages of the process: {anon_huge_mb():.0f} MB")
    rng = random.Random(0)
    vocab = engines["huge"].tokenizer.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    n = 0
    print(f"# threads {torch.get_num_threads()}; ms per decode step, median of {args.steps}")
    for b in sorted(int(x) for x in args.batches.split(",")):
        new = [
            ([rng.randrange(256, vocab) for _ in range(args.context)], f"ab-{i}")
            for i in range(n, b)
        ]
        n = max(n, b)
        for eng in engines.values():
            for prompt, rid in new:
                eng.add_request(rid, prompt, params)
            waiting = {rid for _, rid in new}
            while waiting:
                waiting -= {o.request_id for o in eng.step() if o.outputs[0].token_ids}
        times: dict[str, list[float]] = {k: [] for k in engines}
        for i in range(2 * args.steps):
            name = ("small", "huge")[i % 2]
            t0 = time.perf_counter()
            engines[name].step()
            times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"x{b}: small {med['small']:.2f}  huge {med['huge']:.2f}  huge/small "
            f"{med['huge'] / med['small']:.3f}  (AnonHugePages {anon_huge_mb():.0f} MB)",
            flush=True,
        )
    for eng in engines.values():
        for i in range(n):
            eng.abort(f"ab-{i}")
        eng.check_integrity()


if __name__ == "__main__":
    main()
