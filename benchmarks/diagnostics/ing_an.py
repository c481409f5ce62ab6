import json, sys, pickle, bisect, numpy as np
from pathlib import Path
d = Path(sys.argv[1])
win = pickle.load(open(d / "window.pkl", "rb"))
ev = {}
outs = []
batches = []
for line in open(d / "trace.txt"):
    f = line.split()
    if f[0] in ("send", "recv", "add", "first"):
        ev.setdefault(f[1], {})[f[0]] = float(f[2])
    elif f[0] == "out": outs.append(float(f[1]))
    elif f[0] == "batch": batches.append((float(f[1]), set(f[2:])))
steps = [json.loads(l) for l in open(d / "steps.jsonl") if l.strip()]
online_ids = [s["added"] for s in steps if s.get("class") == "online"]
done = {}
for s in steps:
    if "run_s" in s and s["stopped_at_layer"] is None:
        for rid in s["online_prefill_ids"]:
            done.setdefault(rid, s["t"] + s["run_s"])
recs = sorted([r for r in win.online if r.ttft_s is not None], key=lambda r: r.sent_s)
ids = sorted(online_ids, key=lambda i: ev[i]["send"])[-len(recs):]
base = win.t0_monotonic + win.lead_s
stages = {k: [] for k in ["client->api", "api->corerecv", "recv->add", "add->prefilled", "prefilled->api", "api->client", "ttft"]}
for r, rid in zip(recs, ids):
    e = ev[rid]; sent = base + r.sent_s; first_c = sent + r.ttft_s
    pre = done.get(rid)
    # api reader got batch containing rid
    got = next((t for t, s in batches if rid in s and t >= pre - 1e-3), None) if pre else None
    stages["client->api"].append(e["send"] - sent)
    stages["api->corerecv"].append(e["recv"] - e["send"])
    stages["recv->add"].append(e["add"] - e["recv"])
    stages["add->prefilled"].append((pre or np.nan) - e["add"])
    stages["prefilled->api"].append((got or np.nan) - (pre or np.nan))
    stages["api->client"].append(first_c - (got or np.nan))
    stages["ttft"].append(r.ttft_s)
for k, v in stages.items():
    v = np.array(v) * 1e3
    print(f"{k:16s} p10 {np.nanpercentile(v,10):7.1f} p50 {np.nanpercentile(v,50):7.1f} p90 {np.nanpercentile(v,90):7.1f} max {np.nanmax(v):7.1f} mean {np.nanmean(v):7.1f}")
