"""How far the online-alone runs of one `bench coserve` run differ from each other (same
requests, same code, no offline work): for every pair of alone runs of a mode, the later one's
TTFT and TPOT P50 / P90 / P99 over the earlier one's, on the requests answered in both.
Usage: python alone_spread.py benchmarks/results/coserve-20261205-0237.json
A record of a measurement (session 33), not a maintained command."""
import itertools, json, sys
import numpy as np

d = json.load(open(sys.argv[1]))
alone = [r for r in d["runs"] if r["kind"] == "online alone"]


def answered(run):
    return {q["index"]: q for q in run["online_requests"] if q["error"] is None}


for mode in sorted({r["mode"] for r in alone if r["mode"]}):
    runs = sorted((r for r in alone if r["mode"] == mode), key=lambda r: r["order"])
    for a, b in itertools.combinations(runs, 2):
        qa, qb = answered(a), answered(b)
        ids = sorted(set(qa) & set(qb))
        cols = []
        for key in ("ttft_ms", "tpot_ms"):
            va = [qa[i][key] for i in ids if qa[i][key] is not None]
            vb = [qb[i][key] for i in ids if qb[i][key] is not None]
            cols.append(" / ".join(f"{np.percentile(vb, p) / np.percentile(va, p):.2f}" for p in (50, 90, 99)))
        print(f"{mode}: run {a['order']} -> run {b['order']}: TTFT {cols[0]} | TPOT {cols[1]}")
