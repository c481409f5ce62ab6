import json, sys, numpy as np
from pathlib import Path
for d in map(Path, sys.argv[1:]):
    recs = [json.loads(l) for l in open(d / "steps.jsonl") if l.strip()]
    st = [s for s in recs if "run_s" in s and s["online_prefill_ids"] and s["stopped_at_layer"] is None]
    off = [s for s in st if s["offline"][1] > 0]
    onl = np.array([s["online"][1] for s in st]); runs = np.array([s["run_s"] for s in st]) * 1e3
    print(d.name, "online-prefill steps", len(st), "with offline rows", len(off),
          "offline tokens in them p50", np.median([s["offline"][1] for s in off]) if off else 0,
          "| run ms p50 %.1f mean %.1f; apply mean %.1f" % (np.median(runs), runs.mean(), 1e3 * np.mean([s["apply_s"] for s in st])),
          "| ms per online token %.3f" % (runs.sum() / onl.sum()))
    dec = [s for s in recs if "run_s" in s and not s["online_prefill_ids"] and s["online"][0] > 0 and s["stopped_at_layer"] is None]
    r = np.array([s["run_s"] for s in dec]) * 1e3
    print("   online decode steps", len(dec), "with offline", sum(1 for s in dec if s["offline"][1] > 0), "run p50 %.1f mean %.1f" % (np.median(r), r.mean()))
