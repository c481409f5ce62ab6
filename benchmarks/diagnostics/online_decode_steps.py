"""The online decode steps of each run of a `bench coserve` invocation: steps with online
sequences and no online prompt, how many of them carried offline work, and their run times.

    python benchmarks/diagnostics/online_decode_steps.py STEP_LOG_DIR
"""

from __future__ import annotations

import glob
import json
import os
import sys


def main() -> None:
    print("| step log | online decode steps | with offline work | run ms P50 | P90 | P99 |")
    print("|---|---|---|---|---|---|")
    for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl"))):
        with open(f) as fh:
            steps = [r for r in map(json.loads, fh) if "run_s" in r]
        dec = [r for r in steps if r["online"][0] > 0 and not r["online_prefill_ids"]]
        if not dec:
            continue
        ms = sorted(r["run_s"] * 1e3 for r in dec)
        q = lambda p: ms[int(p * (len(ms) - 1))]  # noqa: E731
        mixed = sum(r["offline"][0] > 0 for r in dec)
        name = os.path.basename(f)
        print(f"| {name} | {len(dec)} | {mixed} | {q(0.5):.1f} | {q(0.9):.1f} | {q(0.99):.1f} |")


if __name__ == "__main__":
    main()
