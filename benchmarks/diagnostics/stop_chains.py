"""Stopped-and-resumed offline steps in `bench coserve` step logs (session 29). Usage:
python stop_chains.py STEPS.jsonl[.gz] [...]. A chain is an offline step stopped between
layers plus the resumed parts that finished it; per log: how many, their total time over the
whole step's prediction (median), and the first part's and the resumed part's time per layer
over the prediction's (31 units: 30 layers and the LM head). A record, not a maintained
command."""

import statistics
import sys

from step_kinds import load  # this directory: the step records of a log, plain or .gz


def main(paths: list[str]) -> None:
    for path in paths:
        chains, cur = [], None
        for r in load(path):
            if r["online"][1] or not r["offline"][1]:
                continue
            if r["stopped_at_layer"] is not None and r["resumed_from_layer"] is None:
                cur = {"pred": r["predicted_s"], "parts": [r]}
                chains.append(cur)
            elif r["resumed_from_layer"] is not None and cur:
                cur["parts"].append(r)
        total, first, rest = [], [], []
        for c in chains:
            if not c["pred"]:
                continue
            t = sum(p["plan_s"] + p["run_s"] + p["apply_s"] for p in c["parts"])
            total.append(t / c["pred"])
            layer = c["parts"][0]["stopped_at_layer"]
            if layer > 0:
                first.append(c["parts"][0]["run_s"] / (c["pred"] * layer / 31))
            if len(c["parts"]) == 2:
                rest.append(c["parts"][1]["run_s"] / (c["pred"] * (31 - layer) / 31))
        med = statistics.median
        print(
            f"{path.split('/')[-1]}: {len(chains)} chains, total / predicted {med(total):.2f}; "
            f"per layer: first part {med(first):.2f}, resumed part {med(rest):.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
