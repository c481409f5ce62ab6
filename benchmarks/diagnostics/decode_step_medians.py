"""Median run time of the one-token online decode steps (one online request decoding, no
offline work in the step) in each engine step log of a `bench coserve` invocation.
Usage: python decode_step_medians.py STEP_LOG_DIR (the directory the bench prints at start)
A record of a measurement (session 34), not a maintained command."""
import glob
import json
import os
import statistics
import sys

for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl"))):
    with open(f) as fh:
        steps = [r for r in map(json.loads, fh) if "run_s" in r]
    one = [r["run_s"] * 1e3 for r in steps if r["online"] == [1, 1] and r["offline"][0] == 0]
    if len(one) >= 20:
        print(f"{os.path.basename(f)}: {len(one)} steps, median {statistics.median(one):.2f} ms")
