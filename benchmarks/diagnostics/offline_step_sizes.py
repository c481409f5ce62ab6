"""Offline tokens per second of a `bench coserve` run's offline-only steps, by step size
(session 27; a record, not a maintained command). Usage: python offline_step_sizes.py
STEPS.jsonl[.gz] ... Only steps that ran whole (neither stopped nor resumed) with no online
work; tokens/s is the step's offline tokens over its run time, per 256-token size class."""

import gzip
import json
import sys
from collections import defaultdict


def main() -> None:
    for path in sys.argv[1:]:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        steps = [
            r
            for r in recs
            if "run_s" in r
            and r["offline"][1] > 0
            and r["online"][1] == 0
            and r["stopped_at_layer"] is None
            and r["resumed_from_layer"] is None
        ]
        print(f"{path}: {len(steps)} whole offline-only steps")
        by_size: dict[int, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        for r in steps:
            k = min(r["offline"][1] // 256, 8) * 256
            by_size[k][0] += 1
            by_size[k][1] += r["offline"][1]
            by_size[k][2] += r["run_s"]
        for k in sorted(by_size):
            n, tok, sec = by_size[k]
            print(f"  {k:5d}+ tokens: {n:4d} steps, {tok / sec:6.0f} offline tokens/s")


if __name__ == "__main__":
    main()
