"""Shared pieces of the benchmarks: workloads, machine description, result files, a step
observer, the check for the `bench` extra."""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import platform
import random
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from conserve.engine.batch import ScheduledBatch
from conserve.engine.stats import StepObserver, StepRecord


@dataclass(frozen=True)
class SyntheticRequest:
    prompt_token_ids: list[int]
    output_len: int


def synthetic_requests(
    n: int, prompt_len: int, output_len: int, vocab_size: int, seed: int = 0, spread: float = 0.125
) -> list[SyntheticRequest]:
    """`n` requests with prompt lengths uniform in prompt_len * (1 +- spread) and random token
    ids (ids 0-255 avoided: special and byte tokens)."""
    rng = random.Random(seed)
    lo, hi = int(prompt_len * (1 - spread)), int(prompt_len * (1 + spread))
    return [
        SyntheticRequest(
            [rng.randrange(256, vocab_size) for _ in range(rng.randint(lo, hi))], output_len
        )
        for _ in range(n)
    ]


OFFLINE_TASKS = ("summary", "generation", "few-shot")


def offline_task_request(
    kind: str, rng: random.Random, maker, shots: list[list[int]]
) -> tuple[list[int], int]:
    """(prompt ids, output tokens) of one request of an offline task, prompts cut by a
    `serve.PromptMaker`: "summary" a long document (700-1200 tokens) with a short output
    (8-24), "generation" a short prompt (24-96) with a long output (128-256), "few-shot" one of
    the long `shots` prefixes plus a 20-60 token question, answered in 1-4 tokens."""
    if kind == "summary":
        return maker.ids(rng.randint(700, 1200)), rng.randint(8, 24)
    if kind == "generation":
        return maker.ids(rng.randint(24, 96)), rng.randint(128, 256)
    if kind == "few-shot":
        return rng.choice(shots) + maker.ids(rng.randint(20, 60)), rng.randint(1, 4)
    raise ValueError(f"unknown offline task {kind!r}")


def machine_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Machine, date and the exact command (`argv`: the arguments after `conserve`; default
    this process's)."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "command": "conserve " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
    }


def write_results(out_dir: str | Path, name: str, markdown: str, data: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M")
    md_path = out / f"{name}-{stamp}.md"
    md_path.write_text(markdown)
    (out / f"{name}-{stamp}.json").write_text(json.dumps(data, indent=2) + "\n")
    return md_path


def distribution(values: list[float]) -> dict[str, float | int]:
    """n, mean, p50, p90, p99 and max of `values` (linear interpolation; p99 of a few dozen
    samples is close to the max)."""
    import numpy as np

    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float)
    out: dict[str, float | int] = {"n": len(values), "mean": float(a.mean())}
    for q in (50, 90, 99):
        out[f"p{q}"] = float(np.percentile(a, q))
    out["max"] = float(a.max())
    return out


class StepClock(StepObserver):
    """Observes an engine's steps (`engine.add_observer(clock)`): when each started
    (`time.perf_counter()`), which requests it carried with how many tokens, and how each
    ended. Benchmarks use it to see when a request's own step begins and how long steps ran."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, dict[str, int]]] = []  # (perf_counter, id -> tokens)
        self.ended: list[StepRecord] = []
        self.started = threading.Event()  # set at the start of the first step after reset()

    def reset(self) -> None:
        self.steps.clear()
        self.ended.clear()
        self.started.clear()

    def on_step_start(self, batch: ScheduledBatch) -> None:
        self.steps.append((time.perf_counter(), {c.request_id: c.num_tokens for c in batch.chunks}))
        self.started.set()

    def on_step_end(self, record: StepRecord) -> None:
        self.ended.append(record)

    def first_start(self, request_id: str, after: float = 0.0) -> float | None:
        """When the first step carrying `request_id` that started at or after `after` began."""
        return next((t for t, ids in self.steps if t >= after and request_id in ids), None)

    def run_times(self) -> list[float]:
        """Compute seconds of the steps since reset() that ran to their end."""
        return [r.run_s for r in self.ended if not r.stopped]

    def stopped_layers(self) -> list[int]:
        """For each step since reset() that was stopped: the layers it ran."""
        return [r.stopped_at_layer for r in self.ended if r.stopped_at_layer is not None]


def require_bench_extra(*modules: str) -> None:
    """Exit with a clear message when a benchmark's optional dependencies (the `bench` extra:
    httpx, matplotlib) are not installed; the server never needs them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"conserve: error: this benchmark needs {', '.join(missing)}; install the bench "
            "extra: pip install 'conserve-llm[bench]'"
        )


def random_prompt(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """`n` random token ids (ids 0-255 avoided: special and byte tokens)."""
    return [rng.randrange(256, vocab_size) for _ in range(n)]


def info_lines(info: dict[str, Any]) -> list[str]:
    return [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in info.items()]
