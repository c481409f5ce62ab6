"""Two settings of one engine alternated step by step on pure decode steps of several batch
sizes, so that a machine whose speed drifts from minute to minute weighs on both alike.

    PYTHONPATH=. python benchmarks/diagnostics/step_ab.py SWITCH [--batches 1,2,4,...]

SWITCH:
- native-loop: a decode step's compiled layers in one call (new) against one call per layer
  (old);
- linear-kernel: the linear layers and the LM head on the compiled kernel at every row count
  (new) against the kernel at 1-2 rows and oneDNN above (old).

Prints per batch size the median step time of each setting (ms, `step()`: plan, run, apply),
the ratio new / old, and whether one step's sampled tokens agree.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("switch", choices=["native-loop", "linear-kernel"])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--steps", type=int, default=40, help="steps timed per setting and size")
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()
    if args.switch == "linear-kernel":
        # build oneDNN's weight copies too (the kernel then takes 1-2 rows unless switched)
        os.environ["CONSERVE_KERNEL_ROWS"] = "2"
    from conserve import LLM
    from conserve.kernels.linear import FastLinear
    from conserve.sampling.params import SamplingParams

    llm = LLM("default", dtype="bfloat16", num_blocks=8192, max_num_seqs=256)
    eng = llm.engine
    runner = eng.runner
    assert runner.native is not None, "the engine does not run compiled decode layers here"
    fast = [
        m.fast for m in runner.model.modules() if isinstance(getattr(m, "fast", None), FastLinear)
    ]

    def use(setting: str) -> None:
        new = setting == "new"
        if args.switch == "native-loop":
            runner.native_loop = new
        else:
            for f in fast:
                f.kernel_rows = sys.maxsize if new else 2

    rng = random.Random(0)
    vocab = eng.tokenizer.vocab_size
    params = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    ids: list[str] = []
    print(
        f"# {args.switch}: threads {torch.get_num_threads()}; ms per decode step, median of "
        f"{args.steps} per setting, alternated"
    )
    for b in sorted(int(x) for x in args.batches.split(",")):
        new_ids = [f"ab-{i}" for i in range(len(ids), b)]
        for rid in new_ids:
            eng.add_request(rid, [rng.randrange(256, vocab) for _ in range(args.context)], params)
        ids += new_ids
        waiting = set(new_ids)
        while waiting:
            waiting -= {o.request_id for o in eng.step() if o.outputs[0].token_ids}
        times: dict[str, list[float]] = {"old": [], "new": []}
        for i in range(2 * args.steps):
            name = ("old", "new")[i % 2]
            use(name)
            t0 = time.perf_counter()
            eng.step()
            times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"x{b}: old {med['old']:.2f}  new {med['new']:.2f}  new/old "
            f"{med['new'] / med['old']:.3f}",
            flush=True,
        )
    use("new")
    for rid in ids:
        eng.abort(rid)
    eng.check_integrity()


if __name__ == "__main__":
    main()
