"""The numbers `conserve bench coserve` reports, computed from per-request records: each run's
summary, the comparison of every policy with the same online requests alone and with the
offline ceiling, and the acceptance checks. Everything after `run_summary` reads only the
summaries (the JSON's `runs`), so the report can be recomputed from the results file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from conserve.bench.coserve_drive import NOT_SENT, RunResult, token_times
from conserve.bench.coserve_plan import (
    MIXED,
    OFFLINE_ALONE,
    ONLINE_ALONE,
    VLLM_ALONE,
    PlannedRun,
)
from conserve.bench.serve import RequestRecord

# The acceptance thresholds of the co-serving issue.
RATIO_LIMIT = 1.2  # online latency, at each of P50 / P90 / P99 of TTFT and TPOT, x alone
HARVEST_MIN = 0.85  # offline tokens/s, share of the ceiling
QUANTILES = ("p50", "p90", "p99")
METRICS = ("ttft", "tpot")
BASELINES = ("fcfs", "priority")  # conserve must be no worse than these


# -- one run ----------------------------------------------------------------------------------


def tpot_s(rec: RequestRecord) -> float | None:
    """(last token time - first token time) / (tokens - 1); None below two tokens."""
    if not rec.ok or rec.output_tokens < 2 or not rec.itl_s:
        return None
    return sum(rec.itl_s) / (rec.output_tokens - 1)


def offline_tokens(rec: RequestRecord, window: float, start: float = 0.0) -> int:
    """Tokens of an offline request inside the window [start, window]: its prompt when its
    first token came inside it, plus each output token that came inside it."""
    times = token_times(rec)
    inside = [t for t in times if start <= t <= window]
    first_inside = bool(times) and start <= times[0] <= window
    return (rec.prompt_len if first_inside else 0) + len(inside)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """P50, P90, P99 (linear interpolation) and the maximum; None when empty."""
    if not values:
        return {q: None for q in (*QUANTILES, "max")}
    a = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {q: float(np.percentile(a, int(q[1:]))) for q in QUANTILES}
    out["max"] = float(a.max())
    return out


def _request_row(x: RequestRecord) -> dict[str, Any]:
    tp = tpot_s(x)
    return {
        "index": x.index,
        "sent_s": round(x.sent_s, 4),
        "prompt_len": x.prompt_len,
        "output_len": x.output_len,
        "output_tokens": x.output_tokens,
        "ttft_ms": None if not x.ok or x.ttft_s is None else round(x.ttft_s * 1e3, 3),
        "tpot_ms": None if tp is None else round(tp * 1e3, 3),
        "e2e_ms": None if not x.ok or x.e2e_s is None else round(x.e2e_s * 1e3, 3),
        "error": x.error,
    }


def run_summary(plan: PlannedRun, r: RunResult, order: int) -> dict[str, Any]:
    """A run as the JSON holds it: what ran, online latencies (ms) with every request's own
    TTFT and TPOT, offline tokens/s inside the window, engine counters, step-log summary."""
    rows = [_request_row(x) for x in r.online]
    busy = r.engine.get("busy_s")
    return {
        "id": plan.id,
        "order": order,
        "kind": plan.kind,
        "mode": plan.mode,
        "variant": plan.variant,
        "label": plan.label,
        "policy": plan.policy,
        "engine_name": plan.engine,
        "slo_from_alone": plan.slo_from_alone,
        "window_s": r.window_s,
        "lead_s": r.lead_s,  # the window's first seconds, before the online load started
        "online": {
            "requests": len(r.online),
            "completed": sum(1 for x in r.online if x.ok),
            "not_sent": sum(1 for x in r.online if x.error == NOT_SENT),
            "errors": sorted({x.error for x in r.online if x.error and x.error != NOT_SENT})[:5],
            "ttft_ms": percentiles([x["ttft_ms"] for x in rows if x["ttft_ms"] is not None]),
            "tpot_ms": percentiles([x["tpot_ms"] for x in rows if x["tpot_ms"] is not None]),
        },
        "offline": _offline_summary(r),
        "engine": r.engine,
        "busy_share": busy / r.window_s if busy is not None and r.window_s > 0 else None,
        "steps": r.steps,
        "cpu_steal_s": r.steal_s,
        "server": r.server,
        "online_requests": rows,
    }


def _offline_summary(r: RunResult) -> dict[str, Any]:
    lead = r.lead_s  # offline work before the online load started is not counted
    tok = sum(offline_tokens(x, r.window_s, lead) for x in r.offline)
    out = sum(len([t for t in token_times(x) if lead <= t <= r.window_s]) for x in r.offline)
    started = sum(1 for x in r.offline if x.ttft_s is not None)
    finished, total = sum(1 for x in r.offline if x.ok), len(r.offline)
    if r.batch is not None:  # whole lines finished by the end of the window
        tok = r.batch["prompt_tokens"] + r.batch["output_tokens"]
        out, started = r.batch["output_tokens"], r.batch["lines"]
        finished, total = r.batch["lines"], r.batch.get("total_lines") or 0
    w = r.window_s - lead if r.window_s > lead else float("nan")
    return {
        "tokens_every_s": None if r.batch is not None else _tokens_every(r, lead),
        "requests": total,
        "started": started,
        "finished": finished,
        "tok_s": tok / w,
        "output_tok_s": out / w,
        # every request finished inside the window: the job was too small, tokens/s understated
        "ran_out": total > 0 and finished >= total,
        "batch": r.batch,
    }


# -- comparisons ------------------------------------------------------------------------------


def latency_ratios(run: dict[str, Any], alone: dict[str, Any]) -> dict[str, Any]:
    """P50 / P90 / P99 of TTFT and TPOT of `run` over those of `alone`, both taken over the
    same online requests: those answered in both runs (by index). `alone` may hold several
    rows per request (alone runs pooled by `merge_alone`): its percentiles are then taken over
    all of them, of the requests answered in every one."""
    mine = {x["index"]: x for x in run["online_requests"]}
    theirs: dict[int, list[dict]] = {}
    for x in alone["online_requests"]:
        theirs.setdefault(x["index"], []).append(x)
    out: dict[str, Any] = {}
    common = 0
    for m in METRICS:
        key = f"{m}_ms"
        both = [i for i in mine if i in theirs and mine[i][key] is not None]
        both = [i for i in both if all(x[key] is not None for x in theirs[i])]
        common = max(common, len(both))
        a = percentiles([mine[i][key] for i in both])
        b = percentiles([x[key] for i in both for x in theirs[i]])
        out[m] = {q: _ratio(a[q], b[q]) for q in QUANTILES}
    out["common_requests"] = common
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _find(runs: list[dict], **want: Any) -> dict | None:
    return next((r for r in runs if all(r.get(k) == v for k, v in want.items())), None)


# the offline job's cumulative tokens are kept at this interval, so that its alone speed can be
# taken over the first seconds of its window, as many as the online load's window
CURVE_STEP_S = 5.0


def _tokens_every(r: RunResult, lead: float) -> list[int]:
    """Offline tokens computed from the window's start to every CURVE_STEP_S seconds in it."""
    ends = [lead + CURVE_STEP_S * k for k in range(1, int((r.window_s - lead) // CURVE_STEP_S) + 1)]
    return [sum(offline_tokens(x, end, lead) for x in r.offline) for end in ends]


def alone_rate(offline_alone: dict, seconds: float | None) -> tuple[float | None, float | None]:
    """The offline job's tokens/s alone over the first `seconds` of its window (its whole window
    when None, or when it has no finer record or is not that long), and the seconds used."""
    off = offline_alone["offline"]
    whole = off["tok_s"], offline_alone["window_s"] - (offline_alone.get("lead_s") or 0.0)
    curve = off.get("tokens_every_s")
    if seconds is None or not curve:
        return whole
    k = min(len(curve), int(seconds // CURVE_STEP_S))
    if k < 1 or k == len(curve):
        return whole
    return curve[k - 1] / (k * CURVE_STEP_S), k * CURVE_STEP_S


def ceiling(alone: dict | None, offline_alone: dict | None) -> dict[str, float | None]:
    """What offline work can get beside the online load: (1 - b) x the offline job's tokens/s
    with the engine to itself, b = the share of the online-alone window the engine was busy.
    The job's speed alone is taken over as many seconds as the online-alone window lasted (or
    its whole window, if shorter): a job's speed moves as it runs (a decode-heavy job slows as
    its contexts grow), so it is compared over a window as long as the mixed runs'."""
    b = alone.get("busy_share") if alone else None
    full = used = None
    if offline_alone:
        full, used = alone_rate(offline_alone, alone.get("window_s") if alone else None)
    value = (1.0 - b) * full if b is not None and full is not None else None
    return {
        "busy_share": b,
        "offline_alone_tok_s": full,
        "offline_alone_over_s": used,
        "ceiling_tok_s": value,
    }


def comparisons(runs: list[dict], label_order: Sequence[str]) -> list[dict[str, Any]]:
    """Per (online mode, offline variant) that has mixed runs: the online-alone latencies, the
    ceiling, and a row per mixed run with its latencies, their ratios to alone, its offline
    tokens/s and its share of the ceiling. Rows follow `label_order`."""
    keys = list(dict.fromkeys((r["mode"], r["variant"]) for r in runs if r["kind"] == MIXED))
    rank = {label: i for i, label in enumerate(label_order)}
    out = []
    for mode, variant in keys:
        alones = [
            r
            for r in runs
            if r["kind"] == ONLINE_ALONE and r["mode"] == mode and r["engine_name"] == "conserve"
        ]
        mixed = [
            r for r in runs if r["kind"] == MIXED and (r["mode"], r["variant"]) == (mode, variant)
        ]
        ours = [r["order"] for r in mixed if r["engine_name"] == "conserve"]
        alone = merge_alone(bracket(alones, ours or [r["order"] for r in mixed]))
        vllm_alone = _find(runs, kind=ONLINE_ALONE, mode=mode, label=VLLM_ALONE)
        c = ceiling(alone, _find(runs, kind=OFFLINE_ALONE, variant=variant))
        mixed.sort(key=lambda r: rank.get(r["label"], len(rank)))
        rows = []
        for r in mixed:
            base = vllm_alone if r["engine_name"] == "vllm" else alone
            rows.append(_comparison_row(r, base, c["ceiling_tok_s"]))
        out.append(
            {
                "mode": mode,
                "variant": variant,
                "alone": _latency_part(alone) if alone else None,
                **c,
                "rows": rows,
            }
        )
    return out


def bracket(alones: list[dict], orders: list[int]) -> list[dict]:
    """The online-alone runs next to the runs made at `orders`: the last one before them and
    the first one after them (those there are; all of `alones` if neither is)."""
    before = [a for a in alones if a["order"] < min(orders)]
    after = [a for a in alones if a["order"] > max(orders)]
    near = ([max(before, key=lambda a: a["order"])] if before else []) + (
        [min(after, key=lambda a: a["order"])] if after else []
    )
    return near or alones


def merge_alone(alones: list[dict]) -> dict | None:
    """Online-alone runs of one mode (made before and after some mixed runs) as one: their
    per-request rows pooled (a request answered in n runs has n rows; percentiles are taken
    over all of them), the busy share and the window averaged, and `drift`: the later run's P50
    TTFT and TPOT over the earlier one's (how much the machine's speed moved meanwhile).

    Pooled, not averaged per request: a request's latency alone varies from run to run (what
    other requests happen to share its steps), and the mean of two such samples varies less
    than either, so percentiles of per-request means put the alone tail below that of any single
    run, and a mixed run (one sample per request) would look slower than alone at P99 even if
    it were another alone run. The pooled rows are samples of one run's distribution."""
    if len(alones) <= 1:
        return alones[0] if alones else None
    pooled = [x for a in alones for x in a["online_requests"]]
    shares = [a["busy_share"] for a in alones if a.get("busy_share") is not None]
    first, last = alones[0]["online"], alones[-1]["online"]
    return {
        **alones[0],
        "id": " + ".join(a["id"] for a in alones),
        "window_s": sum(a["window_s"] for a in alones) / len(alones),
        "busy_share": sum(shares) / len(shares) if shares else None,
        "online_requests": pooled,
        "online": {
            **first,
            "ttft_ms": percentiles([x["ttft_ms"] for x in pooled if x["ttft_ms"] is not None]),
            "tpot_ms": percentiles([x["tpot_ms"] for x in pooled if x["tpot_ms"] is not None]),
        },
        "drift": {m: _ratio(last[f"{m}_ms"]["p50"], first[f"{m}_ms"]["p50"]) for m in METRICS},
        "merged_from": [a["id"] for a in alones],
    }


def _latency_part(r: dict) -> dict[str, Any]:
    return {
        "id": r["id"],
        "drift": r.get("drift"),
        "ttft_ms": r["online"]["ttft_ms"],
        "tpot_ms": r["online"]["tpot_ms"],
        "window_s": r["window_s"],
    }


def _comparison_row(r: dict, alone: dict | None, ceiling_tok_s: float | None) -> dict[str, Any]:
    ratios = latency_ratios(r, alone) if alone else None
    tok_s = r["offline"]["tok_s"]
    return {
        "label": r["label"],
        "policy": r["policy"],
        **_latency_part(r),
        "ratios": ratios,
        "offline_tok_s": tok_s,
        "share_of_ceiling": tok_s / ceiling_tok_s if ceiling_tok_s else None,
        "offline_ran_out": r["offline"]["ran_out"],
        "online_not_sent": r["online"]["not_sent"],
        "preemptions": {k[12:]: v for k, v in r["engine"].items() if k.startswith("preemptions_")},
    }


# -- acceptance -------------------------------------------------------------------------------


def acceptance(comps: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three checks on the `conserve` row (default objectives) of every (mode,
    variant): all six ratios at most RATIO_LIMIT; none of the six above fcfs's or priority's;
    offline tokens/s at least HARVEST_MIN of the ceiling. A check that lacks its runs is
    None (not run), which does not pass."""
    out = []
    for c in comps:
        row = next((r for r in c["rows"] if r["label"] == "conserve"), None)
        checks = [
            _check_as_if_alone(row),
            _check_not_worse(row, c["rows"]),
            _check_harvest(row, c["ceiling_tok_s"]),
        ]
        out.append({"mode": c["mode"], "variant": c["variant"], "checks": checks})
    passed = bool(out) and all(ch["passed"] is True for a in out for ch in a["checks"])
    return {
        "ratio_limit": RATIO_LIMIT,
        "harvest_min": HARVEST_MIN,
        "passed": passed,
        "workloads": out,
    }


def _six(row: dict) -> list[tuple[str, float | None]]:
    return [(f"{m.upper()} {q}", row["ratios"][m][q]) for m in METRICS for q in QUANTILES]


def _check_as_if_alone(row: dict | None) -> dict[str, Any]:
    name = f"online <= {RATIO_LIMIT:g}x alone"
    if row is None or row["ratios"] is None:
        return {"check": name, "passed": None, "detail": "no conserve run or no alone run"}
    six = _six(row)
    missing = [k for k, v in six if v is None]
    if missing:
        return {"check": name, "passed": False, "detail": "no data for " + ", ".join(missing)}
    worst = max(six, key=lambda kv: kv[1])
    over = [f"{k} {v:.2f}x" for k, v in six if v > RATIO_LIMIT]
    detail = f"worst {worst[0]} {worst[1]:.2f}x (limit {RATIO_LIMIT:g}x)"
    if over:
        detail += "; over: " + ", ".join(over)
    return {"check": name, "passed": not over, "detail": detail, "worst": worst[1]}


def _check_not_worse(row: dict | None, rows: list[dict]) -> dict[str, Any]:
    name = "conserve not worse than " + " / ".join(BASELINES)
    others = [r for r in rows if r["label"] in BASELINES and r["ratios"] is not None]
    if row is None or row["ratios"] is None or not others:
        detail = "needs a conserve and an fcfs or priority run"
        return {"check": name, "passed": None, "detail": detail}
    worse = []
    for o in others:
        for (k, mine), (_, theirs) in zip(_six(row), _six(o), strict=True):
            if mine is None or (theirs is not None and mine > theirs):
                worse.append(f"{k} vs {o['label']}: {_x(mine)} > {_x(theirs)}")
    labels = " and ".join(o["label"] for o in others)
    detail = "worse on: " + "; ".join(worse) if worse else f"all six <= {labels}"
    return {"check": name, "passed": not worse, "detail": detail}


def _check_harvest(row: dict | None, ceiling_tok_s: float | None) -> dict[str, Any]:
    name = f"offline >= {HARVEST_MIN:.0%} of ceiling"
    if row is None or not ceiling_tok_s:
        return {"check": name, "passed": None, "detail": "no conserve run or no ceiling"}
    share = row["offline_tok_s"] / ceiling_tok_s
    detail = (
        f"{row['offline_tok_s']:.0f} tok/s = {share:.0%} of {ceiling_tok_s:.0f} "
        f"(min {HARVEST_MIN:.0%})"
    )
    return {"check": name, "passed": share >= HARVEST_MIN, "detail": detail, "share": share}


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"
