"""The offline job's speed over time in `bench coserve` step logs (session 30). Usage:
python offline_phase.py STEPS.jsonl [...] (plain or .gz). A record, not a maintained command.

Per log: in 10-second bins from the first step, the most offline rows of a step and the offline
tokens computed per second of the bin; and over whole offline steps (no online work, not
stopped or resumed), the offline tokens per second of step time by rows per step (buckets of
40). Shows how a decode-heavy job slows as its contexts grow, and steps with few rows."""

import collections
import sys

from step_kinds import load

BIN_S = 10
ROWS_BUCKET = 40


def main(paths: list[str]) -> None:
    for path in paths:
        steps = load(path)
        t0 = steps[0]["t"]
        bins = collections.defaultdict(lambda: [0, 0])  # most rows, offline tokens
        buckets = collections.defaultdict(lambda: [0, 0, 0.0])  # steps, tokens, seconds
        for s in steps:
            rows, tokens = s["offline"]
            b = bins[int((s["t"] - t0) // BIN_S)]
            b[0], b[1] = max(b[0], rows), b[1] + tokens
            whole = s["stopped_at_layer"] is None and s["resumed_from_layer"] is None
            if tokens and not s["online"][1] and whole:
                k = buckets[rows // ROWS_BUCKET * ROWS_BUCKET]
                k[0], k[1], k[2] = k[0] + 1, k[1] + tokens, k[2] + s["run_s"]
        print(path.rsplit("/", 1)[-1])
        print("  s from start: most offline rows, offline tok/s")
        for k, (rows, tokens) in sorted(bins.items()):
            print(f"    {k * BIN_S:4d}: {rows:4d} rows {tokens / BIN_S:7.0f} tok/s")
        print("  whole offline steps by rows: steps, tok/s of step time")
        for k, (n, tokens, sec) in sorted(buckets.items()):
            print(f"    {k:3d}-{k + ROWS_BUCKET - 1:3d} rows: {n:4d} steps {tokens / sec:7.0f} tok/s")


if __name__ == "__main__":
    main(sys.argv[1:])
