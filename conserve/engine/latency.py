"""Iteration-latency model: predicted step time as a function of the work in a batch.

A step's time is a fixed overhead plus terms for the tokens computed (the linear layers), the
rows that reach the vocabulary projection, the context attended by decode tokens, the
context attended by prefill chunks (which grows with chunk length times position), and a
per-sequence cost. Small steps run the matmuls below their peak rate, so the token term is
split at a knee (tokens below it cost more than tokens above it). The model is linear in its
coefficients, fitted by non-negative least squares on a measured profile, and refined from
measured steps while serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = (
    "const",
    "tokens",
    "tokens_small",  # min(tokens, KNEE): the first tokens of a step are dearer
    "sampled",
    "decode_ctx",
    "prefill_attn",
    "seqs",
)
KNEE = 64
_ATTN_SCALE = 1e-3  # prefill_attn is in thousands of (query, key) pairs


@dataclass
class BatchShape:
    """The work in one step, accumulated chunk by chunk."""

    tokens: int = 0
    sampled: int = 0
    decode_ctx: int = 0
    prefill_attn: float = 0.0
    seqs: int = 0

    def add(self, start: int, num_tokens: int, samples: bool = True) -> None:
        """A chunk computing positions start .. start + num_tokens - 1 of one sequence."""
        self.tokens += num_tokens
        self.seqs += 1
        self.sampled += int(samples)
        if num_tokens == 1:
            self.decode_ctx += start + 1
        else:
            # each query attends to the keys up to its own position
            self.prefill_attn += num_tokens * (start + (num_tokens + 1) / 2) * _ATTN_SCALE

    def with_chunk(self, start: int, num_tokens: int, samples: bool = True) -> BatchShape:
        s = BatchShape(self.tokens, self.sampled, self.decode_ctx, self.prefill_attn, self.seqs)
        s.add(start, num_tokens, samples)
        return s

    def vector(self) -> np.ndarray:
        return np.array(
            [
                1.0,
                self.tokens,
                min(self.tokens, KNEE),
                self.sampled,
                self.decode_ctx,
                self.prefill_attn,
                self.seqs,
            ]
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "sampled": self.sampled,
            "decode_ctx": self.decode_ctx,
            "prefill_attn": self.prefill_attn,
            "seqs": self.seqs,
        }

    @staticmethod
    def from_dict(d: dict[str, float]) -> BatchShape:
        return BatchShape(
            int(d["tokens"]),
            int(d["sampled"]),
            int(d["decode_ctx"]),
            float(d["prefill_attn"]),
            int(d["seqs"]),
        )


def nnls(a: np.ndarray, b: np.ndarray, iters: int = 500) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson active set), small dense problems."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(iters):
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12 * max(1.0, abs(w).max()):
            break
        j = np.argmax(np.where(passive, -np.inf, w))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
        w = a.T @ (b - a @ x)
    return x


class LatencyModel:
    """Predicts a step's seconds from its `BatchShape`.

    Fitting minimises relative error (rows weighted by 1/time), since short decode steps and
    long prefill steps matter alike. `observe` adds measured steps; `refit` folds them in with
    the profile as a prior, so the model follows the machine while serving.
    """

    def __init__(self, coef: np.ndarray, meta: dict | None = None) -> None:
        self.coef = np.asarray(coef, dtype=float)
        self.meta = dict(meta or {})
        self._prior: tuple[np.ndarray, np.ndarray] | None = None
        self._obs_x: list[np.ndarray] = []
        self._obs_y: list[float] = []
        self.num_observed = 0

    # -- prediction -------------------------------------------------------------------------
    def predict(self, shape: BatchShape) -> float:
        return float(self.coef @ shape.vector())

    # -- fitting ----------------------------------------------------------------------------
    @staticmethod
    def fit(shapes: list[BatchShape], times: list[float], meta: dict | None = None):
        x = np.stack([s.vector() for s in shapes])
        y = np.asarray(times, dtype=float)
        model = LatencyModel(_weighted_nnls(x, y), meta)
        model._prior = (x, y)
        return model

    def observe(self, shape: BatchShape, seconds: float, keep: int = 4096) -> None:
        self._obs_x.append(shape.vector())
        self._obs_y.append(seconds)
        self.num_observed += 1
        if len(self._obs_x) > keep:
            del self._obs_x[: len(self._obs_x) - keep]
            del self._obs_y[: len(self._obs_y) - keep]

    def refit(self) -> None:
        """Fit profile and measured steps together (measured steps weigh as much as the
        profile once there are as many of them)."""
        if not self._obs_x:
            return
        xs, ys = [np.stack(self._obs_x)], [np.asarray(self._obs_y)]
        if self._prior is not None:
            xs.insert(0, self._prior[0])
            ys.insert(0, self._prior[1])
        self.coef = _weighted_nnls(np.concatenate(xs), np.concatenate(ys))

    # -- evaluation -------------------------------------------------------------------------
    def errors(self, shapes: list[BatchShape], times: list[float]) -> np.ndarray:
        """Relative errors |predicted - measured| / measured."""
        pred = np.array([self.predict(s) for s in shapes])
        y = np.asarray(times, dtype=float)
        return np.abs(pred - y) / y

    # -- storage ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = {"features": list(FEATURES), "coef": self.coef.tolist(), "meta": self.meta}
        if self._prior is not None:
            d["profile_x"] = self._prior[0].tolist()
            d["profile_y"] = self._prior[1].tolist()
        return d

    @staticmethod
    def from_json(d: dict) -> LatencyModel:
        if tuple(d.get("features", ())) != FEATURES:
            raise ValueError("latency profile was made for another feature set")
        model = LatencyModel(np.array(d["coef"]), d.get("meta"))
        if "profile_x" in d:
            model._prior = (np.array(d["profile_x"]), np.array(d["profile_y"]))
        return model

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> LatencyModel:
        return LatencyModel.from_json(json.loads(path.read_text()))

    def describe(self) -> str:
        return ", ".join(f"{n}={c * 1e3:.4g}ms" for n, c in zip(FEATURES, self.coef, strict=True))


def _weighted_nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    w = 1.0 / np.maximum(y, 1e-6)
    return nnls(x * w[:, None], y * w)
