"""Step-log analysis of a `bench coserve` mixed run (session 26): how online steps fare next to
offline work. Usage: python after_offline.py STEPS.jsonl [...] (the engine step logs that
`bench coserve` keeps under its temporary directory). A record, not a maintained command.

Prints per log:
- engine TTFT (arrival in the engine process to the end of the step that computed the prompt)
  P50/P90/P99, and the wait before that step started;
- an online prefill step's measured / predicted time, by what ran just before it: a full
  offline step (its outputs had just been passed on), a stopped offline step (it passed nothing
  on), or a step without offline work;
- steps with online decodes only that took more than 40 ms (about 3x a one-row step here).
"""

import json
import sys

import numpy as np


def analyse(path: str) -> None:
    recs = [json.loads(line) for line in open(path) if line.strip()]
    adds = {r["added"]: r for r in recs if "added" in r and r["class"] == "online"}
    steps = [r for r in recs if "run_s" in r]
    ttft, wait = [], []
    for rid, a in adds.items():
        done = [s for s in steps if rid in s["online_prefill_ids"] and s["stopped_at_layer"] is None]
        if done:
            s = done[-1]
            ttft.append((s["t"] + s["plan_s"] + s["run_s"] - a["arrived"]) * 1e3)
            wait.append((s["t"] - a["arrived"]) * 1e3)
    print(path)
    print("  engine TTFT ms p50/p90/p99 %.0f / %.0f / %.0f; wait p50/p90/max %.1f / %.1f / %.1f"
          % (*np.percentile(ttft, [50, 90, 99]), np.percentile(wait, 50), np.percentile(wait, 90), max(wait)))
    after = {"full offline step": [], "stopped offline step": [], "no offline work": []}
    for i, s in enumerate(steps):
        if not s["online_prefill_ids"] or s["stopped_at_layer"] is not None or not s["predicted_s"] or i == 0:
            continue
        prev = steps[i - 1]
        key = "no offline work" if not prev["offline"][0] else (
            "stopped offline step" if prev["stopped_at_layer"] is not None else "full offline step")
        after[key].append(s["run_s"] / s["predicted_s"])
    for key, r in after.items():
        if r:
            print("  online prefill after a %-20s n %3d  measured/predicted p50 %.2f p90 %.2f max %.2f"
                  % (key, len(r), np.median(r), np.percentile(r, 90), max(r)))
    dec = [s for s in steps if s["online"][0] and not s["online_prefill_ids"] and s["stopped_at_layer"] is None]
    slow = [s for s in dec if s["run_s"] > 0.04]
    print("  online decode steps %d, of them over 40 ms: %d (with offline rows: %d)"
          % (len(dec), len(slow), sum(1 for s in slow if s["offline"][0])))


for p in sys.argv[1:]:
    analyse(p)
