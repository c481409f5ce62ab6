"""Where each online request's time to first token went, per run of a `conserve bench coserve`
invocation, from the engine's step logs and the client's measurements.

Parts (median / P90, ms): api = the HTTP server received it -> the API process passed it to
the engine core (validation, tokenization, and waiting for the cores); pipe = -> the engine
core took it in; wait = -> the step computing its prompt started (a running step stopping at
a safepoint, planning); prefill = that step's start -> the end of the step that computed its
prompt's last chunk; deliver = -> the client read the first token (the API process and the
client); ttft = the client's figure.

    python benchmarks/diagnostics/ttft_parts.py RESULT.json STEP_LOG_DIR

STEP_LOG_DIR and which runs are left out: see coserve_logs.py.
"""

from __future__ import annotations

import os
import statistics
import sys

from coserve_logs import paired_runs

PARTS = ("api", "pipe", "wait", "prefill", "deliver", "ttft")


def parts(recs: list, pairs: list) -> dict[str, list[float]]:
    added = {r["added"]: r for r in recs if r.get("class") == "online"}
    api = {r["api"]: r for r in recs if "api" in r}
    steps = [r for r in recs if "run_s" in r]
    out: dict[str, list[float]] = {k: [] for k in PARTS}
    for rid, q in pairs:
        mine = [s for s in steps if rid in s["online_prefill_ids"]]
        first, last = mine[0], mine[-1]
        a, end = api[rid], last["t"] + last["run_s"] + last["apply_s"]
        out["api"].append((a["sent"] - a["received"]) * 1e3)
        out["pipe"].append((added[rid]["arrived"] - a["sent"]) * 1e3)
        out["wait"].append((first["t"] - added[rid]["arrived"]) * 1e3)
        out["prefill"].append((end - first["t"]) * 1e3)
        out["deliver"].append((a["received"] + q["ttft_ms"] / 1e3 - end) * 1e3)
        out["ttft"].append(q["ttft_ms"])
    return out


def main() -> None:
    result, log_dir = sys.argv[1], sys.argv[2]
    print(f"{os.path.basename(result)}: parts of TTFT, ms, median / P90")
    print("| run | " + " | ".join(PARTS) + " |")
    print("|---|" + "---|" * len(PARTS))
    for name, recs, pairs in paired_runs(result, log_dir, "ttft_ms"):
        if not pairs:
            continue
        p = parts(recs, pairs)
        cells = []
        for k in PARTS:
            v = sorted(p[k])
            cells.append(f"{statistics.median(v):.1f} / {v[int(0.9 * (len(v) - 1))]:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
