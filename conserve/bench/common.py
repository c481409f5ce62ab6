"""Shared pieces of the benchmarks: workloads, machine description, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


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


def machine_info() -> dict[str, Any]:
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
        "command": "conserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }


def write_results(out_dir: str | Path, name: str, markdown: str, data: dict[str, Any]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M")
    md_path = out / f"{name}-{stamp}.md"
    md_path.write_text(markdown)
    (out / f"{name}-{stamp}.json").write_text(json.dumps(data, indent=2) + "\n")
    return md_path


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
