"""Where each online request's client-side TTFT went, from a `bench coserve` run's JSON and
the engine step log of one of its runs (session 28). Usage:

    python ttft_path.py RESULTS.json STEPS.jsonl VARIANT [LABEL]

VARIANT: the offline variant of the run (`-` for an online-alone run), LABEL: the run's label
(`conserve` by default, `online alone`). The step log's `api` lines (the HTTP server's receive
and send times) and `added` lines are matched to the run's online requests in send order.
Prints the P50/P90/max of each part and the ten requests with the largest API-side share:

- client->http: from the client's send to the HTTP server's middleware (the event loop
  reading and parsing the request), relative to the run's median (the clocks of the two
  processes are the same, but the client's send time is kept relative to its own start);
- http->api sent: from there to the request leaving the API process for the engine
  (validation, tokenization, the streaming response starting);
- pipe->engine: to the engine process's reader thread;
- engine: to the end of the step that computed its prompt;
- egress: the rest, until the client read its first token.

A record of an analysis, not a maintained command.
"""

import json
import sys

import numpy as np


def main(results: str, log: str, variant: str, label: str = "conserve") -> None:
    res = json.load(open(results))
    runs = [
        r
        for r in res["runs"]
        if r["label"] == label and (variant == "-" or r["variant"] == variant)
    ]
    reqs = sorted(runs[0]["online_requests"], key=lambda q: q["sent_s"])
    recs = [json.loads(line) for line in open(log) if line.strip()]
    api = {r["api"]: r for r in recs if "api" in r}
    adds = sorted(
        (r for r in recs if r.get("class") == "online" and "added" in r), key=lambda a: a["arrived"]
    )
    adds = adds[len(adds) - len(reqs) :]  # a warm-up request may come first
    end = {}
    for s in (r for r in recs if "run_s" in r):
        for rid in s["online_prefill_ids"]:
            if s["stopped_at_layer"] is None and rid not in end:
                end[rid] = s["t"] + s["plan_s"] + s["run_s"] + s["apply_s"]
    offset = (
        np.median([api[a["added"]]["received"] - q["sent_s"] for q, a in zip(reqs, adds)]) - 0.001
    )
    rows = []
    for q, a in zip(reqs, adds):
        p = api[a["added"]]
        parts = [
            (p["received"] - q["sent_s"] - offset) * 1e3,
            (p["sent"] - p["received"]) * 1e3,
            (a["arrived"] - p["sent"]) * 1e3,
            (end[a["added"]] - a["arrived"]) * 1e3,
        ]
        parts.append(q["ttft_ms"] - sum(parts))
        rows.append((q["ttft_ms"], q["index"], q["prompt_len"], *parts))
    table = np.array([r[3:] for r in rows])
    names = ["client->http", "http->api sent", "pipe->engine", "engine", "egress"]
    for i, name in enumerate(names):
        col = table[:, i]
        print(
            "%-16s p50 %6.1f p90 %6.1f max %6.1f"
            % (name, np.median(col), np.percentile(col, 90), col.max())
        )
    rows.sort(key=lambda r: -(r[3] + r[4] + r[5] + r[7]))
    for r in rows[:10]:
        print(
            "ttft %6.1f idx %3d plen %4d | c->http %6.1f http->sent %6.1f pipe %6.1f engine %6.1f egress %6.1f"
            % r
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
