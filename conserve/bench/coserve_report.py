"""The Markdown report of `conserve bench coserve`, written from the results' JSON sections
(runs, comparisons, acceptance): a table per (online mode, offline variant), the acceptance
summary, and the engine's step logs of the conserve runs."""

from __future__ import annotations

from typing import Any

from conserve.bench.common import info_lines
from conserve.bench.coserve_metrics import METRICS, QUANTILES
from conserve.bench.coserve_plan import ONLINE_ALONE, SLO_LABEL
from conserve.bench.serve import TRACE_ATTRIBUTION
from conserve.tables import md_table

STEP_LOG_LABELS = (ONLINE_ALONE, "conserve", SLO_LABEL)  # runs on the conserve policy


def render(data: dict[str, Any], plots: list[str]) -> str:
    """The whole report: header, one section per workload, acceptance, step logs, plots."""
    lines = ["# Co-serving: online latency beside offline work, per workload and policy", ""]
    lines += info_lines(data["info"])
    lines += [f"- online `{k}`: {_kv(v)}" for k, v in data["load"]["online"].items()]
    lines += [f"- offline `{k}`: {_kv(v)}" for k, v in data["load"]["offline"].items()]
    lines += [f"- {k}: {v}" for k, v in data["load"]["settings"].items()]
    order = ", ".join(f"{r['order']}. {_run_name(r)}" for r in data["runs"])
    lines += [f"- run order (a fresh server each): {order}", f"- {TRACE_ATTRIBUTION}", ""]
    lines += [
        "Latencies in ms, with the ratio to the same online requests alone (the requests "
        "answered in both runs). TPOT of a request: (last token time - first token time) / "
        "(tokens - 1). Ceiling: (1 - b) x the offline job's tokens/s alone, b = the share of "
        "the online-alone window the engine was busy.",
        "",
    ]
    for c in data["comparisons"]:
        lines += _comparison_section(c)
    lines += _acceptance_lines(data["acceptance"])
    logged = [r for r in data["runs"] if r.get("steps") and r["label"] in STEP_LOG_LABELS]
    if logged:
        lines += ["", "## Engine step logs (conserve runs; times inside the window)", ""]
        lines.append(_step_log_table(logged))
        lines += [
            "",
            "Engine TTFT: from the request reaching the engine's process to the end of the "
            "step that computed its prompt. Behind offline: the part of that spent while "
            "steps carrying offline work ran. Stop wait: from an arrival's stop request to "
            "the safepoint that honoured it. Prediction error: median |predicted - measured| "
            "/ measured over the steps that ran to their end. CPU steal: time the hypervisor "
            "gave to other machines during the window (`/proc/stat`).",
        ]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def _kv(v: Any) -> str:
    """A description's value: a dict as `key value, ...`, nested dicts in parentheses."""
    if not isinstance(v, dict):
        return str(v)
    return ", ".join(f"{k} ({_kv(x)})" if isinstance(x, dict) else f"{k} {x}" for k, x in v.items())


def _run_name(r: dict) -> str:
    return " / ".join(x for x in (r["mode"], r["variant"], r["label"]) if x)


def _comparison_section(c: dict[str, Any]) -> list[str]:
    lines = [f"## Online `{c['mode']}` x offline `{c['variant']}`", ""]
    b, full, ceil = c["busy_share"], c["offline_alone_tok_s"], c["ceiling_tok_s"]
    over = c.get("offline_alone_over_s")
    over_text = f" over its first {over:.0f} s" if over else ""
    lines.append(
        f"Alone, the online load kept the engine busy {_pct(b)} of the time; the offline job "
        f"alone ran at {_num(full)} tok/s{over_text}; ceiling {_num(ceil)} tok/s."
    )
    drift = c["alone"].get("drift") if c["alone"] else None
    if drift and all(v is not None for v in drift.values()):
        lines.append(
            "The online load ran alone just before and just after these mixed runs (pooled "
            "below: percentiles over both runs' requests); the "
            f"later run's P50 TTFT was {drift['ttft']:.2f}x and P50 TPOT {drift['tpot']:.2f}x "
            "the earlier one's (how far the machine's speed moved)."
        )
    lines.append("")
    head = ["run"] + [f"{m.upper()} {q}" for m in METRICS for q in QUANTILES]
    head += ["offline tok/s", "of ceiling", "window s", "preemptions"]
    rows = []
    if c["alone"]:
        a = c["alone"]
        cells = [_num(a[f"{m}_ms"][q]) for m in METRICS for q in QUANTILES]
        rows.append(["online alone", *cells, "-", "-", f"{a['window_s']:.0f}", ""])
    for r in c["rows"]:
        cells = []
        for m in METRICS:
            for q in QUANTILES:
                ratio = r["ratios"][m][q] if r["ratios"] else None
                cells.append(_num(r[f"{m}_ms"][q]) + ("" if ratio is None else f" ({ratio:.2f}x)"))
        note = " (job ran out)" if r["offline_ran_out"] else ""
        pre = ", ".join(f"{k} {v:g}" for k, v in r["preemptions"].items() if v)
        share = _pct(r["share_of_ceiling"])
        rows.append(
            [
                r["label"],
                *cells,
                f"{r['offline_tok_s']:.0f}{note}",
                share,
                f"{r['window_s']:.0f}",
                pre,
            ]
        )
    lines += [md_table(head, rows), ""]
    unsent = [f"{r['label']} {r['online_not_sent']}" for r in c["rows"] if r["online_not_sent"]]
    if unsent:
        lead = "Online requests not sent (the users' time limit had passed): "
        lines += [lead + ", ".join(unsent), ""]
    return lines


def _acceptance_lines(acc: dict[str, Any]) -> list[str]:
    lines = [
        "## Acceptance (the `conserve` run, default objectives)",
        "",
        f"Overall: **{'PASS' if acc['passed'] else 'FAIL'}**",
        "",
    ]
    rows = []
    for w in acc["workloads"]:
        for ch in w["checks"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[ch["passed"]]
            rows.append([w["mode"], w["variant"], ch["check"], verdict, ch["detail"]])
    lines.append(md_table(["online", "offline", "check", "result", "numbers"], rows))
    return lines


def _step_log_table(logged: list[dict]) -> str:
    rows = []
    for r in logged:
        st = r["steps"]
        t, b, busy = st["engine_ttft_ms"], st["offline_blocking_ms"], st["busy_s"]
        err = st["prediction_error_median"]
        wait = st.get("stop_wait_ms") or {}
        rows.append(
            [
                _run_name(r),
                _num(t["median"]) + " / " + _num(t["p99"]) + " / " + _num(t["max"]),
                _num(b["p99"]) + " / " + _num(b["max"]),
                f"{st['stopped_steps']} / {st.get('resumed_steps', 0)} "
                f"({st['stopped_compute_s']:.1f} s)",
                _num(wait.get("median")) + " / " + _num(wait.get("max")),
                " / ".join(f"{busy[k]:.1f}" for k in ("online only", "mixed", "offline only")),
                f"{st['plan_apply_s']:.1f}",
                "" if err is None else f"{err:.0%}",
                _num(r.get("cpu_steal_s")),
            ]
        )
    head = ["run", "engine TTFT p50/p99/max ms", "behind offline p99/max ms"]
    head += ["stopped / resumed steps (compute lost)", "stop wait p50/max ms"]
    head += ["busy s: online / mixed / offline", "plan+apply s"]
    head += ["step prediction error (median)", "CPU steal s"]
    return md_table(head, rows)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if abs(v) < 10 else f"{v:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"
