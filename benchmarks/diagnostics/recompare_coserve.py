"""Recompute a `bench coserve` result's latency ratios with the current comparison code (session
32: the two online-alone runs pooled instead of averaged request by request), from the
per-request records in its JSON. Usage:
    python benchmarks/diagnostics/recompare_coserve.py benchmarks/results/coserve-XXXX.json
Prints, per (mode, job) and run, P50 / P90 / P99 of TTFT and TPOT over alone: as reported in the
file, and as recomputed. A record of a measurement, not a maintained command."""
import json
import sys

from conserve.bench.coserve_metrics import comparisons

data = json.load(open(sys.argv[1]))
labels = list(dict.fromkeys(r["label"] for r in data["runs"]))
old = {(c["mode"], c["variant"], r["label"]): r for c in data["comparisons"] for r in c["rows"]}
for c in comparisons(data["runs"], labels):
    for r in c["rows"]:
        before = old[(c["mode"], c["variant"], r["label"])]["ratios"]
        fmt = lambda x, m: " / ".join(f"{x[m][q]:.2f}" for q in ("p50", "p90", "p99"))  # noqa: E731
        print(
            f"{c['mode']} x {c['variant']} {r['label']}: "
            f"TTFT {fmt(before, 'ttft')} -> {fmt(r['ratios'], 'ttft')}; "
            f"TPOT {fmt(before, 'tpot')} -> {fmt(r['ratios'], 'tpot')}"
        )
