"""One trace x offline-variant conserve run with the core/API timestamps traced.
usage: ingress.py VARIANT OUTDIR [--alone] [--nostream-offline]"""
import argparse, asyncio, os, sys, json, pickle
from pathlib import Path
from conserve.bench.coserve import add_coserve_args, build_workloads, resolve_sizes
from conserve.bench.coserve_drive import run_mixed, TraceLoad
from conserve.bench.serve import launch_conserve, served_model
from conserve.model.loader import resolve_model
from conserve.model.tokenizer import Tokenizer
import conserve.bench.coserve_drive as drv

variant, out = sys.argv[1], Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
alone = "--alone" in sys.argv
p = argparse.ArgumentParser(); add_coserve_args(p)
args = p.parse_args(["--offline-variants", variant]); resolve_sizes(args)
tok = Tokenizer.load(resolve_model("default"))
w = build_workloads(args, tok, ["trace"], [variant])
if "--nostream-offline" in sys.argv:
    orig = drv.request_body
    def rb(r, model, ep):
        b = orig(r, model, ep)
        return b
os.environ["CONSERVE_TRACE_T"] = str(out / "trace.txt")
extra = os.environ.get("EXTRA_ARGS", "").split()
srv = launch_conserve("default", "bfloat16", ["--step-log", str(out / "steps.jsonl"), "--data-dir", str(out / "data"), *extra])
try:
    srv.wait_healthy(900)
    model = served_model(srv.base_url, None)
    asyncio.run(run_mixed(srv.base_url, model, TraceLoad([w.warm]), []))
    win = asyncio.run(run_mixed(srv.base_url, model, w.online["trace"], [] if alone else w.offline[variant],
                                None, None, False, 256))
finally:
    srv.stop()
pickle.dump(win, open(out / "window.pkl", "wb"))
print("window", win.window_s)
