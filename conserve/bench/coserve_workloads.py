"""The workloads of `conserve bench coserve`: offline jobs of three shapes, and the online
traffic as a trace replay or as users with one request in flight each. Everything is built
before the first server starts and is a pure function of its arguments and seed, so every run
of a mode sends the same online requests and every run of a variant the same offline job."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from conserve.bench.common import OFFLINE_TASKS, offline_task_request
from conserve.bench.serve import (
    BenchRequest,
    PromptMaker,
    TraceScaling,
    build_requests,
    load_trace,
    scale_trace,
    trace_path,
)

OFFLINE_VARIANTS = ("prefill-heavy", "decode-heavy", "mixed")
ONLINE_MODES = ("trace", "users", "stream")

# (prompt tokens, output tokens), inclusive ranges of the one-shape variants
PREFILL_HEAVY = ((700, 1500), (1, 16))
DECODE_HEAVY = ((20, 100), (128, 384))


@dataclass(frozen=True)
class TraceLoad:
    """Online requests sent at their `arrival_s`, whatever the server does (open loop)."""

    requests: list[BenchRequest]


# how a user's think time is counted (`UsersLoad.think_from`)
THINK_FROM = ("send", "answer")


@dataclass(frozen=True)
class UserPlan:
    """One user and its requests in order, with a think time `think_s[k]` before request k."""

    requests: list[BenchRequest]
    think_s: list[float]


@dataclass(frozen=True)
class UsersLoad:
    """Users with one request in flight each. `think_from`:

    - "send" (paced users): a user's request k is due at the sum of its think times up to k
      (its schedule, the same in every run), and goes out then, or as soon as the answer to its
      request k - 1 is in if that is later. While the engine answers within the think times,
      every run sends the same requests at the same moments, so two runs meet the same
      coincidences of prompts; an engine that answers late still holds the user back.
    - "answer" (a classic closed loop): request k goes out `think_s[k]` seconds after the
      answer to request k - 1. Every answer's latency shifts all later sends, so two runs of
      the same requests, even on the same engine, meet different coincidences (measured:
      P90 TTFT up to 1.60x and P99 TPOT up to 1.33x apart between online-alone runs,
      benchmarks/results/coserve-20261205-0237-alone-spread.txt).

    A user sends nothing new once `max_s` seconds have passed since the start (None: no
    limit), so that a policy that slows online requests a lot cannot stretch a run without
    bound."""

    users: list[UserPlan]
    max_s: float | None = None
    think_from: str = "send"

    @property
    def requests(self) -> list[BenchRequest]:
        """Every user's requests, by index."""
        return sorted((r for u in self.users for r in u.requests), key=lambda r: r.index)


OnlineLoad = TraceLoad | UsersLoad


# -- offline ----------------------------------------------------------------------------------


def offline_variant(
    name: str, n: int, maker: PromptMaker, seed: int
) -> tuple[list[BenchRequest], dict]:
    """The offline job of variant `name`: `n` requests, all sent at time 0."""
    if name == "mixed":
        return offline_job(n, maker, seed)
    if name not in OFFLINE_VARIANTS:
        raise ValueError(f"unknown offline variant {name!r}; known: {', '.join(OFFLINE_VARIANTS)}")
    (p_lo, p_hi), (o_lo, o_hi) = PREFILL_HEAVY if name == "prefill-heavy" else DECODE_HEAVY
    rng = random.Random(f"coserve-offline-{name}-{seed}")
    reqs = []
    for i in range(n):
        p, out = rng.randint(p_lo, p_hi), rng.randint(o_lo, o_hi)
        reqs.append(BenchRequest(i, 0.0, maker.ids(p), p, out))
    return reqs, _offline_desc(name, reqs)


def offline_job(n: int, maker: PromptMaker, seed: int) -> tuple[list[BenchRequest], dict]:
    """The mixed job, interleaved: long prompts with short outputs (summaries), short prompts
    with long outputs (generation), and few-shot prompts sharing one of 4 long prefixes with
    1-4 output tokens (exam answers)."""
    rng = random.Random(seed + 17)
    shots = [maker.ids(600) for _ in range(4)]
    reqs = []
    kinds = {"summary": 0, "generation": 0, "few-shot": 0}
    for i in range(n):
        kind = OFFLINE_TASKS[i % 3]
        kinds[kind] += 1
        p, out = offline_task_request(kind, rng, maker, shots)
        reqs.append(BenchRequest(i, 0.0, p, len(p), out))
    return reqs, _offline_desc("mixed", reqs) | {"kinds": kinds}


def _offline_desc(name: str, reqs: Sequence[BenchRequest]) -> dict:
    return {
        "variant": name,
        "requests": len(reqs),
        "prompt_len": _range([r.prompt_len for r in reqs]),
        "output_len": _range([r.output_len for r in reqs]),
    }


def _range(v: list[int]) -> dict[str, float]:
    return {"min": min(v), "median": float(np.median(v)), "max": max(v)} if v else {}


# -- online -----------------------------------------------------------------------------------


def trace_lengths(
    trace: str, n: int, scaling: TraceScaling
) -> tuple[list[float], list[tuple[int, int]], float]:
    """Send times, (prompt, output) lengths and speedup of the trace's first `n` rows after
    the start time, scaled."""
    return scale_trace(load_trace(trace_path(trace)), n, scaling)


def trace_load(
    times: Sequence[float], lens: Sequence[tuple[int, int]], maker: PromptMaker
) -> TraceLoad:
    """The trace replay: request i at times[i] with lengths lens[i]."""
    return TraceLoad(build_requests(times, lens, maker, ids=True))


def users_load(
    lens: Sequence[tuple[int, int]],
    users: int,
    think_s: float,
    maker: PromptMaker,
    seed: int,
    max_s: float | None = None,
    think_from: str = "send",
) -> UsersLoad:
    """`users` users sharing the rows `lens` round-robin (request j of user u is row
    u + j * users, so each user gets a like mix of lengths). Think times are exponential with
    mean `think_s`, drawn from each user's own seeded stream; `think_from` as in UsersLoad."""
    if users < 1:
        raise ValueError("users must be at least 1")
    if think_from not in THINK_FROM:
        raise ValueError(f"think_from must be one of {', '.join(THINK_FROM)}, not {think_from!r}")
    reqs = build_requests([0.0] * len(lens), lens, maker, ids=True)
    plans = []
    for u in range(users):
        mine = reqs[u::users]
        rng = random.Random(f"coserve-user-{seed}-{u}")
        thinks = [rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0 for _ in mine]
        plans.append(UserPlan(mine, thinks))
    return UsersLoad(plans, max_s, think_from)


def describe_online(load: OnlineLoad) -> dict:
    """Sizes of the online load, for the report."""
    reqs = load.requests
    out: dict = {
        "requests": len(reqs),
        "prompt_median": float(np.median([r.prompt_len for r in reqs])),
        "output_median": float(np.median([r.output_len for r in reqs])),
    }
    if isinstance(load, TraceLoad):
        out["span_s"] = round(reqs[-1].arrival_s, 1)
    else:
        out["users"] = len(load.users)
        out["think_mean_s"] = round(float(np.mean([t for u in load.users for t in u.think_s])), 2)
        out["max_s"] = load.max_s
        out["think_from"] = load.think_from
    return out
