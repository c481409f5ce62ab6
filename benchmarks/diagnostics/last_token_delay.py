"""How long each online request's last token took from the engine to the client, per run of a
`conserve bench coserve` invocation.

For every online request: the client's end (the time the server received it plus the
end-to-end latency the client measured) minus the end of the last step with online work that
ended before it. Alone, that is the API process and the client passing on the last token;
beside offline work, whatever the offline activity right after the online request added.

    python benchmarks/diagnostics/last_token_delay.py RESULT.json STEP_LOG_DIR

STEP_LOG_DIR and which runs are left out: see coserve_logs.py.
"""

from __future__ import annotations

import bisect
import os
import sys

from coserve_logs import paired_runs


def delays(recs: list, pairs: list) -> list[float]:
    api = {r["api"]: r for r in recs if "api" in r}
    ends = sorted(
        r["t"] + r["run_s"] + r["apply_s"] for r in recs if "run_s" in r and r["online"][0] > 0
    )
    out = []
    for rid, q in pairs:
        client_end = api[rid]["received"] + q["e2e_ms"] / 1e3
        i = bisect.bisect_right(ends, client_end) - 1
        out.append((client_end - ends[i]) * 1e3)
    return out


def main() -> None:
    result, log_dir = sys.argv[1], sys.argv[2]
    print(f"{os.path.basename(result)}: last online token, engine step end -> client, ms")
    print("| run | requests | P50 | P90 | max |")
    print("|---|---|---|---|---|")
    for name, recs, pairs in paired_runs(result, log_dir, "e2e_ms"):
        d = sorted(delays(recs, pairs))
        n = len(d)
        if not n:
            continue
        print(f"| {name} | {n} | {d[n // 2]:.1f} | {d[int(0.9 * (n - 1))]:.1f} | {d[-1]:.1f} |")


if __name__ == "__main__":
    main()
