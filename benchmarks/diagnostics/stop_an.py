import json, sys
from pathlib import Path
d = Path(sys.argv[1])
ev = {}
for line in open(d / "trace.txt"):
    f = line.split()
    if f[0] in ("send", "recv", "add"):
        ev.setdefault(f[1], {})[f[0]] = float(f[2])
steps = [json.loads(l) for l in open(d / "steps.jsonl") if l.strip()]
online = [s["added"] for s in steps if s.get("class") == "online"]
runs = [s for s in steps if "run_s" in s]
for rid in online[1:]:
    e = ev[rid]; r = e["recv"]
    cur = [s for s in runs if s["t"] <= r <= s["t"] + s["run_s"] + s["apply_s"]]
    nxt = [s for s in runs if s["t"] > r][:1]
    desc = ""
    for s in cur:
        desc += f" running: t+{(r - s['t'])*1e3:.1f}ms run {s['run_s']*1e3:.1f} plan {s['plan_s']*1e3:.1f} apply {s['apply_s']*1e3:.1f} on {s['online']} off {s['offline']} stop {s['stopped_at_layer']} kept {s.get('kept')} end->add {(e['add'] - s['t'] - s['run_s'])*1e3:.1f}"
    if not cur and nxt:
        desc += f" idle/plan; next step in {(nxt[0]['t'] - r)*1e3:.1f} ms plan {nxt[0]['plan_s']*1e3:.1f}"
    print(f"{rid[-10:]} recv->add {(e['add'] - r)*1e3:6.1f} |{desc}")
