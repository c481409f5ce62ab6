"""Iteration-latency model: predicted step time as a function of the work in a batch.

A step's time is a fixed overhead plus terms for the tokens computed (the linear layers), the
rows that reach the vocabulary projection, the context attended by decode tokens, the
context attended by prefill chunks (which grows with chunk length times position), and a
per-sequence cost. Small steps run the matmuls below their peak rate, so the token term is
split at a knee (tokens below it cost more than tokens above it). The model is linear in its
coefficients, fitted by non-negative least squares on a measured profile, and refined from
measured steps while serving (`LatencyModel.observe`: a robust refit on a schedule, with the
profile as a prior whose weight fades).
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


# -- the online refit ----------------------------------------------------------------------
# Refit after these many observed steps, then every REFIT_EVERY: early refits correct a bad
# profile within a few seconds of serving, later ones follow slow changes of the machine.
REFIT_AT = (16, 32, 64, 128, 256)
REFIT_EVERY = 256
# The profile rows together weigh as much as PRIOR_STEPS observed steps until there are that
# many; beyond, their weight falls as PRIOR_STEPS**2 / n, so their share of the fit is 20% at 128
# steps, 1.5% at 512 and 0.4% at 1024: what the machine does wins, and the profile still decides
# the directions the observed steps leave open (e.g. long prompts when only decodes ran).
PRIOR_STEPS = 64
OBS_WINDOW = 4096  # observed steps kept (the newest), so the fit follows a machine that changes
# Robust refit: a step whose time is off the fit by more than this factor in log terms (or
# 3x the median one, if larger) weighs less (Huber), and beyond REJECT times it, nothing: a 10x
# step from a GC pause or a page-fault storm does not move the fit. 0.1 (about 10%) is twice
# a quiet machine's step noise.
HUBER_MIN = 0.1
REJECT = 10
ROBUST_ITERS = 3


def refit_due(num_observed: int) -> bool:
    """Whether `LatencyModel.observe` refits after its `num_observed`-th step."""
    if num_observed <= REFIT_AT[-1]:
        return num_observed in REFIT_AT
    return num_observed % REFIT_EVERY == 0


class LatencyModel:
    """Predicts a step's seconds from its `BatchShape`.

    Fitting minimises relative error (rows weighted by 1/time), since short decode steps and
    long prefill steps matter alike. `observe(shape, seconds)` is the whole serving contract:
    call it after every step; it refits on the `refit_due` schedule, with the profile as a
    prior whose weight fades as measured steps accumulate (PRIOR_STEPS) and with outlying
    steps down-weighted, so a wrong profile is corrected within a few hundred steps.
    """

    def __init__(self, coef: np.ndarray, meta: dict | None = None) -> None:
        self.coef = np.asarray(coef, dtype=float)
        self.meta = dict(meta or {})
        self._prior: tuple[np.ndarray, np.ndarray] | None = None
        self._obs_x: list[np.ndarray] = []
        self._obs_y: list[float] = []
        self.num_observed = 0
        self.num_refits = 0

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

    def observe(self, shape: BatchShape, seconds: float) -> None:
        """One measured step; refits when `refit_due` says so."""
        if not seconds > 0:  # nothing was timed (or a clock went backwards)
            return
        self._obs_x.append(shape.vector())
        self._obs_y.append(float(seconds))
        self.num_observed += 1
        if len(self._obs_y) > OBS_WINDOW:
            del self._obs_x[: len(self._obs_x) - OBS_WINDOW]
            del self._obs_y[: len(self._obs_y) - OBS_WINDOW]
        if refit_due(self.num_observed):
            self.refit()

    def refit(self) -> None:
        """Fit the observed steps with the profile as a fading prior (see PRIOR_STEPS)."""
        if not self._obs_y:
            return
        px, py = self._prior_rows()
        ox, oy = np.stack(self._obs_x), np.asarray(self._obs_y)
        n = len(oy)
        prior_total = PRIOR_STEPS if n <= PRIOR_STEPS else PRIOR_STEPS**2 / n
        pw = np.full(len(py), prior_total / max(len(py), 1))
        self.coef = _robust_nnls(px, py, pw, ox, oy, self.coef)
        self.num_refits += 1

    def _prior_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The profile's rows; for a model made from bare coefficients, its own predictions
        on a few typical shapes (so the refit still has something to fall back on)."""
        if self._prior is not None:
            return self._prior
        x = np.stack([s.vector() for s in _typical_shapes()])
        y = x @ self.coef
        keep = y > 0
        self._prior = (x[keep], y[keep])
        return self._prior

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
        coef = np.asarray(d["coef"], dtype=float)
        if coef.shape != (len(FEATURES),) or not np.isfinite(coef).all():
            raise ValueError("latency profile coefficients are malformed")
        model = LatencyModel(coef, d.get("meta"))
        if "profile_x" in d:
            x = np.asarray(d["profile_x"], dtype=float)
            y = np.asarray(d["profile_y"], dtype=float)
            if x.ndim != 2 or x.shape[1] != len(FEATURES) or y.shape != (len(x),):
                raise ValueError("latency profile rows are malformed")
            model._prior = (x, y)
        return model

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @staticmethod
    def load(path: Path) -> LatencyModel:
        """Raises OSError (unreadable), ValueError (not a profile: bad JSON, other features)
        or KeyError (fields missing)."""
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError("latency profile is not a JSON object")
        return LatencyModel.from_json(d)

    def describe(self) -> str:
        return ", ".join(f"{n}={c * 1e3:.4g}ms" for n, c in zip(FEATURES, self.coef, strict=True))


def _typical_shapes() -> list[BatchShape]:
    shapes = []
    for b, ctx in ((1, 128), (8, 512), (64, 512), (128, 1024)):
        s = BatchShape()
        for _ in range(b):
            s.add(ctx - 1, 1)
        shapes.append(s)
    for start, n in ((0, 16), (0, 256), (0, 1024), (1024, 512)):
        shapes.append(BatchShape().with_chunk(start, n))
    shapes.append(shapes[2].with_chunk(0, 128))
    return shapes


def _weighted_nnls(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """NNLS on relative errors: row i weighs w_i * ((x_i . coef - y_i) / y_i)**2."""
    scale = 1.0 / np.maximum(y, 1e-6)
    if w is not None:
        scale = scale * np.sqrt(w)
    a, b = x * scale[:, None], y * scale
    if len(b) > _REDUCE_ROWS:
        a, b = _reduce(a, b)
    return nnls(a, b)


_REDUCE_ROWS = 256


def _reduce(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same least-squares problem on a few rows: any R with R'R = [a b]'[a b] gives
    |R[:, :-1] c - R[:, -1]|^2 = |a c - b|^2 - const, so NNLS finds the same coefficients.
    For the thousands of rows of a serving refit this costs one small Gram matrix, where
    LAPACK least squares on the tall matrix took tens of milliseconds on a busy CPU (BLAS
    threads contending with the engine's)."""
    m = np.column_stack([a, b])
    norms = np.maximum(np.linalg.norm(m, axis=0), 1e-300)
    vals, vecs = np.linalg.eigh((m / norms).T @ (m / norms))  # columns scaled for accuracy
    r = (np.sqrt(np.maximum(vals, 0.0))[:, None] * vecs.T) * norms
    return r[:, :-1], r[:, -1]


def _robust_nnls(
    px: np.ndarray,
    py: np.ndarray,
    pw: np.ndarray,
    ox: np.ndarray,
    oy: np.ndarray,
    start: np.ndarray,
) -> np.ndarray:
    """Prior rows (weights `pw`) and observed rows (weight 1), iteratively reweighted from the
    coefficients `start` (the model before the refit): a row far off the fit weighs less, one
    very far off nothing. For observed rows that drops outlying steps; for prior rows, it lets
    the profile yield where the machine's steps contradict it and keep its say where they do
    not reach."""
    x, y = np.concatenate([px, ox]), np.concatenate([py, oy])
    base = np.concatenate([pw, np.ones(len(oy))])
    coef = start
    for _ in range(ROBUST_ITERS):
        coef = _weighted_nnls(x, y, base * _robust_weights(x, y, coef, len(py)))
    return coef


def _robust_weights(x: np.ndarray, y: np.ndarray, coef: np.ndarray, n_prior: int) -> np.ndarray:
    """Weights that turn the relative-error fit into a Huber fit of r = log(predicted /
    measured), zero beyond REJECT times the Huber threshold. r is symmetric (a 10x pause and
    a step 10x too short are equally far), where the relative error of a too short step is
    huge. The threshold follows the observed rows' median |r|, so a wrong model is not taken
    for outliers: rows keep their weight until the fit has come close."""
    y = np.maximum(y, 1e-9)
    pred = np.maximum(x @ coef, 1e-9)
    rel = (pred - y) / y
    r = np.abs(np.log(pred / y))
    c = max(HUBER_MIN, 3 * float(np.median(r[n_prior:])))
    # (r / rel)**2 makes the fit's loss rel**2 into r**2; the Huber weight then caps it
    to_log = np.where(np.abs(rel) > 1e-9, (r / np.maximum(np.abs(rel), 1e-9)) ** 2, 1.0)
    w = to_log * np.minimum(1.0, c / np.maximum(r, 1e-12))
    w[r > REJECT * c] = 0.0
    return w
