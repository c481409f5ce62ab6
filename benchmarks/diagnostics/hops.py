import json, sys, pickle, numpy as np
from pathlib import Path
for d in map(Path, sys.argv[1:]):
    win = pickle.load(open(d / "window.pkl", "rb"))
    recs = [json.loads(l) for l in open(d / "steps.jsonl") if l.strip()]
    adds = {r["added"]: r for r in recs if r.get("class") == "online" and "added" in r}
    done = {}
    for s in recs:
        if "run_s" in s and s["stopped_at_layer"] is None:
            for rid in s["online_prefill_ids"]:
                done.setdefault(rid, s["t"] + s["run_s"] + s["apply_s"])
    base = win.t0_monotonic + win.lead_s
    on = sorted([r for r in win.online if r.ttft_s is not None], key=lambda r: r.sent_s)
    ids = sorted(adds, key=lambda i: adds[i]["arrived"])[-len(on):]
    rows = []
    for r, rid in zip(on, ids):
        a = adds[rid]; sent = base + r.sent_s
        rows.append((a["arrived"] - sent, a["t"] - a["arrived"], done[rid] - a["t"], sent + r.ttft_s - done[rid], r.ttft_s))
    x = np.array(rows) * 1e3
    print(d.name, " | ".join("%s p50 %.1f mean %.1f" % (n, np.median(x[:, i]), x[:, i].mean()) for i, n in enumerate(["api-in", "wait", "engine", "out", "ttft"])))
