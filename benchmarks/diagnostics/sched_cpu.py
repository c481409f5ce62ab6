"""Who had the CPUs while the engine stepped (session 29). Usage:

    perf record -k mono -e sched:sched_switch -a -o sched.data sleep 45   # during a run
    perf script -i sched.data -F cpu,time,event,trace > sched.txt
    python sched_cpu.py sched.txt STEPS.jsonl PID=label [PID=label ...]

PIDs are processes (`ps -eLo pid,tid,comm,args` while the run goes maps threads to them);
threads of other processes count as "other", CPU 0's idle task as "idle". Per kind of step
(online, offline whole / stopped / resumed) prints the wall time and each label's share of
the two CPUs' time inside those steps. With --bins N, draws the first N stopped offline steps
as one character per 2 ms per CPU (the label's first letter, "." idle), from 50 ms before the
step starts. A record, not a maintained command."""

import argparse
import bisect
import collections
import json
import re
from pathlib import Path

SWITCH = re.compile(
    r"\[(\d+)\]\s+([\d.]+): sched:sched_switch: .*prev_pid=(\d+) .* ==> .*next_pid=(\d+)"
)


def thread_owners(pids: dict[int, str], ps: str | None) -> dict[int, str]:
    """Thread id -> label: from a `ps -eLo pid,tid,...` snapshot, or from /proc while the
    processes live."""
    owners = {0: "idle"}
    for pid, label in pids.items():
        owners[pid] = label
        for task in Path(f"/proc/{pid}/task").glob("*"):
            owners[int(task.name)] = label
    if ps:
        with open(ps) as f:
            for line in f:
                cols = line.split()
                if len(cols) > 1 and cols[0].isdigit() and int(cols[0]) in pids:
                    owners[int(cols[1])] = pids[int(cols[0])]
    return owners


def segments(path: str) -> dict[int, list[tuple[float, float, int]]]:
    """Per CPU: (start, end, thread) of every stretch a thread ran."""
    last: dict[int, tuple[int, float]] = {}
    segs: dict[int, list] = collections.defaultdict(list)
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        m = SWITCH.search(line)
        if not m:
            continue
        cpu, t, nxt = int(m.group(1)), float(m.group(2)), int(m.group(4))
        if cpu in last:
            segs[cpu].append((last[cpu][1], t, last[cpu][0]))
        last[cpu] = (nxt, t)
    return segs


def share(segs, owners, a: float, b: float) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for v in segs.values():
        i = max(0, bisect.bisect_left(v, (a, a, 0)) - 1)
        for s, e, tid in v[i:]:
            if s >= b:
                break
            out[owners.get(tid, "other")] += max(0.0, min(e, b) - max(s, a))
    return out


def kind(s: dict) -> str:
    if s["online"][1] > 0:
        return "online" + (" + offline" if s["offline"][1] > 0 else "")
    if s["stopped_at_layer"] is not None and s["resumed_from_layer"] is None:
        return "offline stopped"
    if s["resumed_from_layer"] is not None:
        return "offline resumed"
    return "offline whole"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sched")
    ap.add_argument("steps")
    ap.add_argument("pids", nargs="+", help="PID=label")
    ap.add_argument("--ps", help="a `ps -eLo pid,tid,comm,args` snapshot taken during the run")
    ap.add_argument("--bins", type=int, default=0)
    ap.add_argument(
        "--draw",
        default="offline stopped",
        help="kind of step --bins draws; 'arrival': whole offline steps an online request "
        "reached the API process during",
    )
    args = ap.parse_args()
    pids = {int(p): lab for p, lab in (x.split("=") for x in args.pids)}
    owners = thread_owners(pids, args.ps)
    segs = segments(args.sched)
    t0 = min(v[0][0] for v in segs.values())
    t1 = max(v[-1][1] for v in segs.values())
    with open(args.steps) as f:
        steps = [json.loads(x) for x in f if x.strip()]
    steps = [s for s in steps if "run_s" in s and t0 <= s["t"] and s["t"] + s["run_s"] <= t1]
    wall: dict[str, float] = collections.defaultdict(float)
    cpu: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: collections.defaultdict(float)
    )
    for s in steps:
        k = kind(s)
        wall[k] += s["run_s"]
        for who, sec in share(segs, owners, s["t"], s["t"] + s["run_s"]).items():
            cpu[k][who] += sec
    for k in sorted(wall):
        print(f"{k}: {wall[k]:.2f} s of steps")
        for who, sec in sorted(cpu[k].items(), key=lambda x: -x[1]):
            print(f"  {100 * sec / (2 * wall[k]):5.1f}%  {who}")
    with open(args.steps) as f:
        api = sorted(r["received"] for r in map(json.loads, filter(str.strip, f)) if "api" in r)
    drawn = 0
    for s in steps:
        if args.draw == "arrival":
            i = bisect.bisect_left(api, s["t"])
            hit = i < len(api) and api[i] < s["t"] + s["run_s"]
            if drawn >= args.bins or kind(s) != "offline whole" or not hit:
                continue
        elif drawn >= args.bins or kind(s) != args.draw:
            continue
        drawn += 1
        a = s["t"] - 0.05
        n = int((s["run_s"] + 0.05) / 0.002) + 1
        arrivals = [round(1000 * (x - s["t"])) for x in api if a <= x <= s["t"] + s["run_s"]]
        print(
            f"{kind(s)} step, {1000 * s['run_s']:.0f} ms (predicted "
            f"{1000 * (s['predicted_s'] or 0):.0f}), stopped at layer {s['stopped_at_layer']}, "
            f"resumed from {s['resumed_from_layer']}; online arrivals at {arrivals} ms"
        )
        for c in sorted(segs):
            row = ""
            for i in range(n):
                got = share({c: segs[c]}, owners, a + 0.002 * i, a + 0.002 * (i + 1))
                who = max(got, key=got.get) if got else "?"
                row += "." if who == "idle" else who[0]
            print(f"  cpu{c} {row}")


if __name__ == "__main__":
    main()
