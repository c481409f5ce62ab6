"""Where each online request's time to first token went, per run of a `conserve bench coserve`
invocation, from the engine's step logs and the client's measurements.

Parts (median / P90, ms): api = the HTTP server received it -> the API process passed it to
the engine core (validation, tokenization, and waiting for the cores); pipe = -> the engine
core took it in; wait = -> the step computing its prompt started (a running step stopping at
a safepoint, planning); prefill = that step's start -> the end of the step that computed its
prompt's last chunk; deliver = -> the client read the first token (the API process and the
client); ttft = the client's figure.

    python benchmarks/diagnostics/ttft_parts.py RESULT.json STEP_LOG_DIR

STEP_LOG_DIR: the directory `bench coserve` printed at its start; its NN-*.jsonl files are
the runs in order. The first online request of each step log is the driver's warm-up and is
skipped; runs where some online requests were not answered are left out.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys

PARTS = ("api", "pipe", "wait", "prefill", "deliver", "ttft")


def parts(run: dict, step_log: str) -> dict[str, list[float]] | None:
    recs = [json.loads(line) for line in open(step_log)]
    added = {r["added"]: r for r in recs if r.get("class") == "online"}
    ids = list(added)[1:]
    api = {r["api"]: r for r in recs if "api" in r}
    steps = [r for r in recs if "run_s" in r]
    reqs = sorted(
        (q for q in run["online_requests"] if q["ttft_ms"] is not None), key=lambda q: q["sent_s"]
    )
    if len(reqs) != len(ids):
        return None
    out: dict[str, list[float]] = {k: [] for k in PARTS}
    for rid, q in zip(ids, reqs):
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
    runs = json.load(open(result))["runs"]
    print(f"{os.path.basename(result)}: parts of TTFT, ms, median / P90")
    print("| run | " + " | ".join(PARTS) + " |")
    print("|---|" + "---|" * len(PARTS))
    for i, run in enumerate(runs):
        logs = glob.glob(os.path.join(log_dir, f"{i + 1:02d}-*.jsonl"))
        if not run.get("online_requests") or not logs:
            continue
        p = parts(run, logs[0])
        if not p:
            continue
        name = f"{i + 1:02d} {run['mode']} {run.get('variant') or ''} {run['label']}".replace("  ", " ")
        cells = []
        for k in PARTS:
            v = sorted(p[k])
            cells.append(f"{statistics.median(v):.1f} / {v[int(0.9 * (len(v) - 1))]:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
