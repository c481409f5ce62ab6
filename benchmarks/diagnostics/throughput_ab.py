"""`bench throughput`'s conserve workload run whole, three settings of one engine alternated
run by run (prefix caching off, so a later run gains nothing from an earlier one):

- old: the linear layers on the compiled kernel at 1-2 rows and oneDNN above, and one call
  per compiled decode layer;
- kernel: the linear layers on the compiled kernel at every row count;
- both: that, and a decode step's compiled layers in one call.

    PYTHONPATH=. python benchmarks/diagnostics/throughput_ab.py [REQUESTS] [ROUNDS]
"""

import os
import sys
import time

os.environ["CONSERVE_KERNEL_ROWS"] = "2"  # build oneDNN's weight copies; switched per run below

from conserve import LLM  # noqa: E402
from conserve.bench.throughput import synthetic_requests  # noqa: E402
from conserve.kernels.linear import FastLinear  # noqa: E402
from conserve.sampling.params import SamplingParams  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    llm = LLM("default", dtype="bfloat16", enable_prefix_caching=False)
    eng = llm.engine
    reqs = synthetic_requests(n, 256, 128, eng.tokenizer.vocab_size)
    prompts = [r.prompt_token_ids for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    fast = [
        m.fast
        for m in eng.runner.model.modules()
        if isinstance(getattr(m, "fast", None), FastLinear)
    ]
    tokens = sum(len(r.prompt_token_ids) + r.output_len for r in reqs)
    settings = {"old": (2, False), "kernel": (sys.maxsize, False), "both": (sys.maxsize, True)}
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    for rnd in range(rounds):
        for name, (rows, loop) in settings.items():
            for f in fast:
                f.kernel_rows = rows
            eng.runner.native_loop = loop
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            print(f"round {rnd} {name}: {tokens / dt:.0f} tok/s ({dt:.1f} s)", flush=True)
    eng.check_integrity()


if __name__ == "__main__":
    main()
