"""The runs of one `conserve bench coserve` invocation beside their engine step logs, for the
diagnostics that read both (ttft_parts.py, last_token_delay.py).

STEP_LOG_DIR is the directory `bench coserve` printed at its start ("engine step logs under
..."); its NN-*.jsonl files are the runs in order. The first online request of each step log
is the driver's warm-up and is skipped; runs where some online requests were not answered
(fcfs, priority beside the users) are left out, as their requests would not pair up.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator


def paired_runs(result: str, log_dir: str, answered: str) -> Iterator[tuple[str, list, list]]:
    """For each run with a step log: its label, its step-log records, and (engine request id,
    client record) pairs of its online requests in send order; `answered` names the client
    field that is None for a request not answered."""
    with open(result) as f:
        runs = json.load(f)["runs"]
    for i, run in enumerate(runs):
        logs = glob.glob(os.path.join(log_dir, f"{i + 1:02d}-*.jsonl"))
        if not run.get("online_requests") or not logs:
            continue
        with open(logs[0]) as f:
            recs = [json.loads(line) for line in f]
        ids = [r["added"] for r in recs if r.get("class") == "online"][1:]
        reqs = sorted(
            (q for q in run["online_requests"] if q[answered] is not None),
            key=lambda q: q["sent_s"],
        )
        if len(reqs) != len(ids):
            continue
        name = f"{i + 1:02d} {run['mode']} {run.get('variant') or ''} {run['label']}"
        yield name.replace("  ", " "), recs, list(zip(ids, reqs, strict=True))
