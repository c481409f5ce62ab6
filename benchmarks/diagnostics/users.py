"""One users-mode x offline-variant run (conserve). usage: users.py VARIANT OUTDIR [--alone]
EXTRA_ARGS env: server flags. Prints TTFT percentiles and arrival->add waits by category."""
import argparse, asyncio, os, sys, json, pickle
from pathlib import Path
import numpy as np
from conserve.bench.coserve import add_coserve_args, build_workloads, resolve_sizes
from conserve.bench.coserve_drive import run_mixed, TraceLoad
from conserve.bench.serve import launch_conserve, served_model
from conserve.model.loader import resolve_model
from conserve.model.tokenizer import Tokenizer

variant, out = sys.argv[1], Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
alone = "--alone" in sys.argv
p = argparse.ArgumentParser(); add_coserve_args(p)
args = p.parse_args(["--offline-variants", variant, "--online-modes", "users"]); resolve_sizes(args)
tok = Tokenizer.load(resolve_model("default"))
w = build_workloads(args, tok, ["users"], [variant])
extra = os.environ.get("EXTRA_ARGS", "").split()
srv = launch_conserve("default", "bfloat16", ["--step-log", str(out / "steps.jsonl"), "--data-dir", str(out / "data"), *extra])
try:
    srv.wait_healthy(900)
    model = served_model(srv.base_url, None)
    asyncio.run(run_mixed(srv.base_url, model, TraceLoad([w.warm]), []))
    win = asyncio.run(run_mixed(srv.base_url, model, w.online["users"], [] if alone else w.offline[variant],
                                None, None, False, 256))
finally:
    srv.stop()
pickle.dump(win, open(out / "window.pkl", "wb"))
t = np.array([r.ttft_s for r in win.online if r.ttft_s is not None]) * 1e3
tp = np.array([r.tpot_s for r in win.online if getattr(r, 'tpot_s', None) is not None]) * 1e3
print(out.name, "n", len(t), "TTFT p50 %.1f p90 %.1f p99 %.1f mean %.1f" % (*np.percentile(t, [50, 90, 99]), t.mean()),
      "| TPOT p50 %.1f p90 %.1f" % tuple(np.percentile(tp, [50, 90])) if len(tp) else "")
print("offline tokens", getattr(win, "offline_tokens", None), "window", win.window_s)
recs = [json.loads(l) for l in open(out / "steps.jsonl") if l.strip()]
t0 = win.t0_monotonic + win.lead_s; t1 = t0 + win.window_s
steps = [s for s in recs if "run_s" in s and t0 <= s["t"] <= t1]
off = sum(s["offline"][1] for s in steps if s["stopped_at_layer"] is None)
print("offline tokens in window %d = %.0f tok/s" % (off, off / win.window_s))
adds = [r for r in recs if r.get("class") == "online" and "added" in r and r.get("arrived") and r["t"] >= t0]
w_ = np.array([(r["t"] - r["arrived"]) * 1e3 for r in adds])
sw = np.array([s["stop_wait_s"] * 1e3 for s in steps if s.get("stop_wait_s")])
print("arrive->add p50 %.1f mean %.1f p90 %.1f max %.1f" % (np.median(w_), w_.mean(), np.percentile(w_, 90), w_.max()),
      "| stop wait n %d p50 %.1f mean %.1f max %.1f" % ((len(sw), np.median(sw), sw.mean(), sw.max()) if len(sw) else (0, 0, 0, 0)))
