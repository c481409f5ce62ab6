"""Two builds of the compiled decode layers (decode_layers_bf16), alternated step by step in one
engine, on pure decode steps of several batch sizes.

    python benchmarks/diagnostics/decode_layer_ab.py OLD.so [--batches 1,2,4,8,16,32] [--steps 40]

OLD.so: a kernel library built from an earlier tree with the same entry point (for instance the
cached build ~/.cache/conserve/kernels/conserve-kernels-<key>.so of that tree; builds before
session 37 had a per-layer decode_layer_bf16 instead); NEW: the one this tree builds. Every other part of the step (LM head, sampling, host work) is the same code, so the
difference is the layers'. Prints per batch size the median step time of each build (ms), the
ratio new / old, and the largest difference of the logits of one step run by each.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import time

import torch

from conserve import LLM
from conserve.sampling.params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--steps", type=int, default=40, help="steps timed per build and size")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    llm = LLM("default", dtype="bfloat16", num_blocks=4096, max_num_seqs=256)
    eng = llm.engine
    nd = eng.runner.native
    assert nd is not None, "the engine does not run compiled decode layers here"
    new_fn = nd.fn
    old_fn = ctypes.CDLL(args.old).decode_layers_bf16
    old_fn.argtypes, old_fn.restype = new_fn.argtypes, new_fn.restype
    builds = {"old": old_fn, "new": new_fn}
    rng = random.Random(0)
    vocab = eng.tokenizer.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    ids: list[str] = []
    print(f"threads {torch.get_num_threads()}; ms per decode step, median of {args.steps}")
    for b in sorted(int(x) for x in args.batches.split(",")):
        new = [f"ab-{i}" for i in range(len(ids), b)]
        for rid in new:
            eng.add_request(rid, [rng.randrange(256, vocab) for _ in range(args.context)], params)
        ids += new
        waiting = set(new)
        while waiting:
            waiting -= {o.request_id for o in eng.step() if o.outputs[0].token_ids}
        times: dict[str, list[float]] = {k: [] for k in builds}
        for i in range(2 * args.steps):
            name = ("old", "new")[i % 2]
            nd.fn = builds[name]
            t0 = time.perf_counter()
            eng.step()
            times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratio = med["new"] / med["old"]
        print(f"x{b}: old {med['old']:.2f}  new {med['new']:.2f}  new/old {ratio:.3f}")
    nd.fn = new_fn
    for rid in ids:
        eng.abort(rid)


if __name__ == "__main__":
    main()
