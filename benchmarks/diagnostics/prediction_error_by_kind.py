"""Step-time prediction error of a `bench coserve` run's engine step logs, by kind of step.

    python benchmarks/diagnostics/prediction_error_by_kind.py STEP_LOG_DIR/NN-*.jsonl ...

For each step log: the median |predicted - measured| / measured over the steps that ran to
their end (what `bench coserve` reports), then the same per kind of step (online work only,
offline only, both; decode or with prompt tokens; one row, up to 16 rows, more), with the
signed median (positive: predicted longer than it ran).
"""

from __future__ import annotations

import json
import os
import statistics as st
import sys


def kind(r: dict) -> str:
    on, off = r["online"], r["offline"]  # [sequences, rows]
    k = "online-only" if on[0] and not off[0] else "offline-only" if off[0] and not on[0] else "both"
    rows = on[1] + off[1]
    k += " decode" if on[0] + off[0] == rows else " prompt"
    return k + (" x1" if rows == 1 else " <=16 rows" if rows <= 16 else " >16 rows")


def main() -> None:
    for f in sys.argv[1:]:
        errs: dict[str, list[float]] = {}
        for line in open(f):
            r = json.loads(line)
            if "run_s" not in r or r.get("stopped_at_layer") is not None:
                continue
            if r.get("resumed_from_layer") is not None:
                continue
            errs.setdefault(kind(r), []).append((r["predicted_s"] - r["run_s"]) / r["run_s"])
        every = [abs(e) for v in errs.values() for e in v]
        print(f"{os.path.basename(f)}: {len(every)} steps, median |error| {st.median(every):.0%}")
        for k, v in sorted(errs.items(), key=lambda kv: -len(kv[1])):
            med = st.median(abs(e) for e in v)
            print(f"  {k:<28} {len(v):>5} steps  |error| {med:4.0%}  signed {st.median(v):+4.0%}")


if __name__ == "__main__":
    main()
