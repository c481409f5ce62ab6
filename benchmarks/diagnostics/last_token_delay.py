"""How long each online request's last token took from the engine to the client, per run of a
`conserve bench coserve` invocation.

For every online request: the client's end (the time the server received it plus the
end-to-end latency the client measured) minus the end of the last step with online work that
ended before it. Alone, that is the API process and the client passing on the last token;
beside offline work, whatever the offline activity right after the online request added.

    python benchmarks/diagnostics/last_token_delay.py RESULT.json STEP_LOG_DIR

STEP_LOG_DIR: the directory `bench coserve` printed at its start ("engine step logs under
..."), whose NN-*.jsonl files are the runs in order. The first online request of each run's
step log is the driver's warm-up and is skipped; runs where some online requests were not
answered (fcfs, priority beside the users) are left out.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import sys


def delays(run: dict, step_log: str) -> list[tuple[float, int, int]]:
    recs = [json.loads(line) for line in open(step_log)]
    online_ids = [r["added"] for r in recs if r.get("class") == "online"][1:]
    api = {r["api"]: r for r in recs if "api" in r}
    ends = sorted(
        r["t"] + r["run_s"] + r["apply_s"] for r in recs if "run_s" in r and r["online"][0] > 0
    )
    reqs = sorted(
        (q for q in run["online_requests"] if q["e2e_ms"] is not None), key=lambda q: q["sent_s"]
    )
    if len(reqs) != len(online_ids):  # some unanswered: the two lists would not pair up
        return []
    out = []
    for rid, q in zip(online_ids, reqs):
        client_end = api[rid]["received"] + q["e2e_ms"] / 1e3
        i = bisect.bisect_right(ends, client_end) - 1
        out.append(((client_end - ends[i]) * 1e3, q["index"], q["output_tokens"]))
    return out


def main() -> None:
    result, log_dir = sys.argv[1], sys.argv[2]
    runs = json.load(open(result))["runs"]
    print(f"{os.path.basename(result)}: last online token, engine step end -> client, ms")
    print("| run | requests | P50 | P90 | max |")
    print("|---|---|---|---|---|")
    for i, run in enumerate(runs):
        logs = glob.glob(os.path.join(log_dir, f"{i + 1:02d}-*.jsonl"))
        if not run.get("online_requests") or not logs:
            continue
        d = sorted(x[0] for x in delays(run, logs[0]))
        n = len(d)
        if not n:
            continue
        name = f"{i + 1:02d} {run['mode']} {run.get('variant') or ''} {run['label']}".replace("  ", " ")
        print(f"| {name} | {n} | {d[n // 2]:.1f} | {d[int(0.9 * (n - 1))]:.1f} | {d[-1]:.1f} |")


if __name__ == "__main__":
    main()
