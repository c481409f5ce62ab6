"""Engine time by kind of step in `bench coserve` step logs (sessions 27-28). Usage:
python step_kinds.py STEPS.jsonl [...] (plain or .gz). A record, not a maintained command.

Per log: the span from the first to the last step, the time in steps (plan + run + apply), and
per kind (online only, offline only, both; offline steps also by stopped / resumed) the steps,
seconds, offline tokens, offline tokens per second of those steps and the mean step time. The
offline tokens a job completed are those of the offline steps that were not stopped (a stopped
step's tokens count again in its resumed part)."""

import collections
import gzip
import json
import sys


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "run_s" in r]


def main(paths: list[str]) -> None:
    for path in paths:
        steps = load(path)
        t0, t1 = steps[0]["t"], steps[-1]["t"] + steps[-1]["run_s"]
        kinds = collections.defaultdict(lambda: [0, 0.0, 0])  # steps, seconds, offline tokens
        for s in steps:
            on, off = s["online"][1] > 0, s["offline"][1] > 0
            kind = "mixed" if on and off else "online" if on else "offline" if off else "empty"
            if off and not on:
                kind += " stopped" if s["stopped_at_layer"] is not None else ""
                kind += " resumed" if s["resumed_from_layer"] is not None else ""
            k = kinds[kind]
            k[0] += 1
            k[1] += s["plan_s"] + s["run_s"] + s["apply_s"]
            k[2] += s["offline"][1]
        busy = sum(k[1] for k in kinds.values())
        print(
            f"{path.split('/')[-1]} span {t1 - t0:.1f}s busy {busy:.1f}s idle {t1 - t0 - busy:.1f}"
        )
        for kind, (n, sec, tok) in sorted(kinds.items()):
            print(
                f"  {kind:25s} steps {n:6d} s {sec:7.1f} offtok {tok:8d} "
                f"tok/s {tok / max(sec, 1e-9):7.0f} mean_step_ms {1000 * sec / n:6.1f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
