"""Recently finished requests as the API process timed them, for windowed latency percentiles
(the dashboard). Bounded: the newest `limit` requests of the last `keep_s` seconds."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Finished:
    """One finished request: when it ended (`time.monotonic()`), its class, its time to first
    token and mean time per output token after the first (None with fewer than two tokens)."""

    at: float
    klass: str
    ttft: float | None
    tpot: float | None
    tokens: int


def percentile(values: Sequence[float], p: float) -> float | None:
    """The `p`th percentile by the nearest-rank rule (None for no values)."""
    if not values:
        return None
    ranked = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ranked)))
    return ranked[rank - 1]


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., "p99": ...}."""
    return {f"p{p}": percentile(values, p) for p in PERCENTILES}


class RecentRequests:
    def __init__(self, limit: int = 20_000, keep_s: float = 900.0) -> None:
        self.keep_s = keep_s
        self._items: deque[Finished] = deque(maxlen=limit)

    def add(
        self,
        klass: str,
        started: float,
        first_token: float | None,
        last_token: float | None,
        tokens: int,
        now: float | None = None,
    ) -> None:
        """A request admitted at `started` ended now; its first and last tokens came at
        `first_token` and `last_token` (None: it produced none)."""
        now = time.monotonic() if now is None else now
        ttft = None if first_token is None else first_token - started
        tpot = None
        if first_token is not None and last_token is not None and tokens > 1:
            tpot = (last_token - first_token) / (tokens - 1)
        self._items.append(Finished(now, klass, ttft, tpot, tokens))
        while self._items and self._items[0].at < now - self.keep_s:
            self._items.popleft()

    def window(self, seconds: float, now: float | None = None) -> list[Finished]:
        """The requests that ended in the last `seconds`."""
        now = time.monotonic() if now is None else now
        return [f for f in self._items if f.at >= now - seconds]


def latency_summary(items: Iterable[Finished], klass: str = "online") -> dict:
    """Count and TTFT / TPOT percentiles of the requests of `klass` among `items`."""
    chosen = [f for f in items if f.klass == klass]
    return {
        "requests": len(chosen),
        "ttft": percentiles([f.ttft for f in chosen if f.ttft is not None]),
        "tpot": percentiles([f.tpot for f in chosen if f.tpot is not None]),
    }
