"""Measure step times over a grid of batch shapes, judge the measurement, fit the latency model.

The profile runs synthetic batches straight through the model runner (random token ids,
disjoint KV blocks), so it needs no requests and leaves the scheduler untouched. Every shape
runs several times and keeps its fastest run (the least disturbed one); the spread of the runs
and the drift of a reference step measured at the start, middle and end tell a busy or noisy
machine, which is measured again and then refused (`NoisyMachineError`). A profile is cached
on disk, per model file, dtype, device name, thread count, attention implementation and block
size, only when its error on held-out shapes is within `MAX_HELDOUT_ERROR`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conserve.engine.batch import ScheduledBatch, ScheduledChunk
from conserve.engine.latency import FEATURES, BatchShape, LatencyModel
from conserve.paths import cache_dir
from conserve.platform import device_name
from conserve.sampling.params import SamplingParams
from conserve.sampling.types import SampleSpec

log = logging.getLogger(__name__)

PROFILE_VERSION = 2  # 2: keyed by device name; minimum of >= 3 runs; co-serving shapes
# One chunk of a step: (start, num_tokens) or (start, num_tokens, samples). A chunk samples
# unless it says otherwise; an offline prompt cut mid-way (a time limit) does not.
Chunk = tuple[int, int] | tuple[int, int, bool]
Spec = list[Chunk]
Timer = Callable[[], float]

MIN_REPS = 3  # runs per shape: the minimum of three is stable, and three runs show a spread
# A shape's spread is (slowest - fastest) / fastest over its runs. On a quiet machine
# back-to-back runs of one step agree within a few percent; a machine busy with other work
# spreads them by tens of percent. Above this median, the fastest runs cannot be trusted to
# be the undisturbed ones.
MAX_MEDIAN_SPREAD = 0.10
# The reference step timed at the start, middle and end of the grid: a machine that changed
# speed during the profile (another job started or ended, clocks throttled) shows here even
# when each shape's runs agree, since the runs of one shape follow each other closely.
MAX_REFERENCE_DRIFT = 0.15
NOISE_RETRIES = 2  # re-measurements of a noisy grid before `conserve profile` gives up
START_RETRIES = 0  # at server start: measure once, serve, let the online refit correct it
# The median relative error on held-out shapes a cached profile may have. Profiles measured
# on a quiet machine came out at 4-10% (benchmarks/results/latency-profile-*.json, issue 13);
# the busy-machine profile that set every default wrong had 179%.
MAX_HELDOUT_ERROR = 0.15
HELDOUT_COUNT = 24
HELDOUT_SEED = 1
CHECK_SEED = 2  # `conserve profile --check` measures shapes the profile has not seen
STEP_TOKENS = 2048  # held-out steps stay within the default token budget of a step
# 16 decodes at 256 and a 64-token prompt: every term of the model, in about a tenth of
# a second on a small CPU model
REFERENCE: Spec = [(255, 1)] * 16 + [(0, 64)]
# the first of these that fits the engine's KV pool is the reference (a small pool in tests)
REFERENCES: list[Spec] = [REFERENCE, [(63, 1)] * 8 + [(0, 32)], [(0, 16)]]
REFERENCE_RUNS = 3  # times the runs of a shape, at each of the three points


class NoisyMachineError(RuntimeError):
    """The machine was too busy or noisy to measure step times; `report` holds the best
    profile measured all the same (per-shape minimum over every attempt)."""

    def __init__(self, message: str, report: ProfileReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Noise:
    """How much a measurement can be trusted."""

    spreads: list[float]  # per shape: (max - min) / min over its runs
    reference: list[float]  # fastest run of REFERENCE at the start, middle and end

    @property
    def median_spread(self) -> float:
        return float(np.median(self.spreads)) if self.spreads else 0.0

    @property
    def drift(self) -> float:
        ref = self.reference
        return (max(ref) - min(ref)) / min(ref) if ref and min(ref) > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.median_spread > MAX_MEDIAN_SPREAD or self.drift > MAX_REFERENCE_DRIFT

    def describe(self) -> str:
        return (
            f"median spread of a shape's runs {self.median_spread * 100:.1f}% "
            f"(limit {MAX_MEDIAN_SPREAD * 100:.0f}%), reference step drift "
            f"{self.drift * 100:.1f}% (limit {MAX_REFERENCE_DRIFT * 100:.0f}%)"
        )


@dataclass
class ProfileReport:
    model: LatencyModel
    train_errors: np.ndarray
    heldout_errors: np.ndarray
    heldout: list[tuple[BatchShape, float, float]]  # shape, measured, predicted
    seconds: float
    descriptions: list[str]  # of the held-out shapes
    noise: Noise = field(default_factory=lambda: Noise([], []))
    attempts: int = 1  # grid measurements made (1 + retries used)

    @property
    def heldout_median_error(self) -> float:
        return float(np.median(self.heldout_errors))

    @property
    def within_bound(self) -> bool:
        """Good enough to cache: held-out median error within MAX_HELDOUT_ERROR."""
        return self.heldout_median_error <= MAX_HELDOUT_ERROR

    def summary(self) -> str:
        h = self.heldout_errors
        return (
            f"held-out shapes: {len(h)}, median abs error {np.median(h) * 100:.1f}% "
            f"(bound {MAX_HELDOUT_ERROR * 100:.0f}%), p90 {np.percentile(h, 90) * 100:.1f}%, "
            f"max {h.max() * 100:.1f}%; training shapes: {len(self.train_errors)}, median "
            f"{np.median(self.train_errors) * 100:.1f}%; {self.noise.describe()}; "
            f"{self.attempts} attempt(s)"
        )

    def as_dict(self) -> dict:
        return {
            "model": self.model.to_json(),
            "heldout": [
                {"shape": s.as_dict(), "measured_s": t, "predicted_s": p}
                for s, t, p in self.heldout
            ],
            "heldout_median_error": self.heldout_median_error,
            "train_median_error": float(np.median(self.train_errors)),
            "median_spread": self.noise.median_spread,
            "reference_drift": self.noise.drift,
            "attempts": self.attempts,
            "seconds": self.seconds,
        }


def report_markdown(report: ProfileReport, engine, info: dict | None = None) -> str:
    from conserve.tables import md_table

    lines = ["# Step latency profile", ""]
    if info:
        lines += [f"- {k}: {v}" for k, v in info.items()] + [""]
    lines += [
        f"Model {engine.model_name}, {engine.config.dtype}, {engine.config.device} "
        f"({device_name(engine.config.device)}), {engine.config.num_threads} threads; "
        f"profiled in {report.seconds:.0f} s.",
        "",
        report.summary(),
        "",
        "Coefficients (ms per unit): "
        + ", ".join(f"{n} {c * 1e3:.4g}" for n, c in zip(FEATURES, report.model.coef, strict=True)),
        "",
        "Held-out shapes:",
        "",
    ]
    rows = [
        [desc, f"{t * 1e3:.1f}", f"{p * 1e3:.1f}", f"{(p - t) / t * 100:+.1f}%"]
        for desc, (_, t, p) in zip(report.descriptions, report.heldout, strict=True)
    ]
    lines.append(md_table(["shape", "measured ms", "predicted ms", "error"], rows))
    return "\n".join(lines) + "\n"


# -- where profiles live --------------------------------------------------------------------
def profile_path(engine) -> Path:
    """The cache file for this engine's model, dtype, machine, threads and compute path (the
    compiled kernels' build, or torch; the rows up to which decode steps run natively; the
    layers setting)."""
    cfg = engine.config
    src = Path(getattr(engine, "model_source", "") or engine.model_name)
    try:
        st = src.stat()
        ident = f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = str(src)
    kernels = getattr(engine.runner, "kernels", None)
    attention = f"kernel-{kernels.fingerprint}" if kernels is not None else "torch"
    native = getattr(engine.runner, "native", None)
    if native is not None:  # decode steps up to this many rows run whole layers natively
        attention += f"-native{native.max_rows}"
    key = (
        f"v{PROFILE_VERSION}|{ident}|{cfg.dtype}|{cfg.device}|{device_name(cfg.device)}|"
        f"{cfg.num_threads}|{attention}|{cfg.layers}|{cfg.cache.block_size}"
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "profiles" / f"{engine.model_name}-{cfg.dtype}-{digest}.json"


def foreign_device(model: LatencyModel, engine) -> str | None:
    """The device a profile names when it is not this engine's device (None: it is, or the
    profile does not say)."""
    named = model.meta.get("device_name")
    here = device_name(engine.config.device)
    return named if named and named != here else None


def cached_profile(engine) -> LatencyModel | None:
    """The cached profile for this engine, if there is a readable one made on this device."""
    path = profile_path(engine)
    if not path.exists():
        return None
    try:
        model = LatencyModel.load(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("ignoring unreadable latency profile %s: %s", path, e)
        return None
    other = foreign_device(model, engine)
    if other is not None:
        log.warning(
            "ignoring latency profile %s: it was measured on %r, this is %r",
            path,
            other,
            device_name(engine.config.device),
        )
        return None
    return model


def load_profile(engine, where: str) -> LatencyModel:
    """What the engine plans with: "auto" is `load_or_build`; otherwise the profile file
    `where`, used even if made on another device (with a warning: the user chose it)."""
    if where == "auto":
        return load_or_build(engine)
    model = LatencyModel.load(Path(where))
    other = foreign_device(model, engine)
    if other is not None:
        log.warning(
            "latency profile %s was measured on %r, not on this %r: its step times may be "
            "off until the online refit corrects them",
            where,
            other,
            device_name(engine.config.device),
        )
    return model


# -- the shapes -----------------------------------------------------------------------------
def _decodes(b: int, ctx: int) -> Spec:
    return [(ctx - 1, 1)] * b


def training_grid(max_len: int, capacity: int) -> list[Spec]:
    """Shapes the fit is made from: decode batches, prompt chunks, and the steps co-serving
    runs (online decodes or an online prompt chunk beside many offline decodes, offline
    prompt chunks cut mid-prompt beside decodes)."""
    specs: list[Spec] = []
    for ctx in (32, 256, 1024):
        for b in (1, 2, 4, 8, 16, 32, 64, 128):
            specs.append(_decodes(b, ctx))
    specs += [_decodes(256, 300), _decodes(64, 1500), _decodes(192, 1500)]
    for start in (0, 1024):
        for n in (2, 16, 64, 128, 256, 512, 1024):
            specs.append([(start, n)])
    specs.append([(0, 2048)])
    for n, k in ((64, 4), (128, 8), (256, 4), (32, 16)):
        specs.append([(0, n)] * k)
    for b, ctx in ((4, 256), (16, 512), (32, 128)):
        for start, n in ((0, 64), (0, 512), (1024, 256)):
            specs.append(_decodes(b, ctx) + [(start, n)])
    # co-serving: an online prompt chunk (10-600 tokens) beside many offline decodes
    for b, ctx in ((16, 1200), (64, 600), (128, 300), (256, 900)):
        for n in (12, 100, 600):
            specs.append(_decodes(b, ctx) + [(0, n)])
    # co-serving: a few online decodes beside many offline decodes at longer contexts
    specs += [_decodes(2, 200) + _decodes(96, 1400), _decodes(1, 60) + _decodes(160, 700)]
    # offline prompt chunks cut by a time limit (no sample) beside decodes, some online
    for b, ctx, (start, n) in (
        (32, 800, (0, 37)),
        (128, 400, (512, 300)),
        (64, 1000, (1024, 900)),
        (16, 200, (300, 1500)),
        (200, 600, (0, 180)),
    ):
        specs.append(_decodes(b, ctx) + [(start, n, False)])
    specs.append(_decodes(2, 300) + [(0, 40)] + _decodes(48, 900) + [(700, 400, False)])
    return [s for s in specs if _fits(s, max_len, capacity)]


def heldout_grid(
    max_len: int, capacity: int, count: int = HELDOUT_COUNT, seed: int = HELDOUT_SEED
) -> list[Spec]:
    """Random serving-like shapes, drawn like the training grid's kinds but at other sizes."""
    rng = random.Random(seed)
    kinds = (
        _random_online_decodes,
        _random_offline_decodes,
        _random_online_chunk,
        _random_offline_chunk,
        _random_mix,
    )
    specs: list[Spec] = []
    for i in range(count * 100):  # bounded: a tiny cache may fit few of the shapes
        spec = kinds[i % len(kinds)](rng)
        if spec and _fits(spec, max_len, capacity):
            specs.append(spec)
            if len(specs) == count:
                break
    return specs


def _random_online_decodes(rng: random.Random) -> Spec:
    return [(rng.randint(16, 1500), 1) for _ in range(rng.choice([1, 2, 3, 5, 8]))]


def _random_offline_decodes(rng: random.Random) -> Spec:
    online = [(rng.randint(20, 400), 1) for _ in range(rng.choice([0, 1, 2, 3]))]
    b = rng.choice([16, 32, 64, 96, 128, 192, 256])
    return online + [(rng.randint(100, 1500), 1) for _ in range(b)]


def _random_online_chunk(rng: random.Random) -> Spec:
    online = [(rng.randint(20, 400), 1) for _ in range(rng.choice([0, 1, 2]))]
    offline = [(rng.randint(100, 1500), 1) for _ in range(rng.randint(16, 256))]
    return online + offline + [(0, rng.randint(10, 600))]


def _random_offline_chunk(rng: random.Random) -> Spec:
    decodes = [(rng.randint(100, 1500), 1) for _ in range(rng.choice([0, 16, 48, 100, 200]))]
    start = rng.choice([0, 0, 300, 900, 1800])
    n = rng.randint(8, STEP_TOKENS - len(decodes))  # any length: cut to a time limit
    return decodes + [(start, n, rng.random() < 0.3)]  # samples only if it ends the prompt


def _random_mix(rng: random.Random) -> Spec:
    spec: Spec = [(rng.randint(16, 900), 1) for _ in range(rng.choice([0, 3, 12, 48]))]
    k = rng.choice([1, 1, 2, 3])
    for _ in range(k):
        spec.append((rng.choice([0, 0, 300, 700, 1200]), rng.randint(8, STEP_TOKENS // k)))
    return spec


def _fits(spec: Spec, max_len: int, capacity: int) -> bool:
    """Every sequence within the context window, and all of them in the KV pool (each rounded
    up to whole blocks; 64 tokens covers any block size up to 64)."""
    blocks = sum(-(-(c[0] + c[1]) // 64) * 64 for c in spec)
    return all(c[0] + c[1] <= max_len for c in spec) and blocks <= capacity


def _chunk(c: Chunk) -> tuple[int, int, bool]:
    return (c[0], c[1], c[2] if len(c) > 2 else True)


def shape_of(spec: Spec) -> BatchShape:
    shape = BatchShape()
    for c in spec:
        shape.add(*_chunk(c))
    return shape


def make_batch(spec: Spec, block_size: int, vocab_size: int, rng: random.Random) -> ScheduledBatch:
    chunks = []
    next_block = 0
    greedy = SampleSpec(SamplingParams(temperature=0.0, max_tokens=1))
    for i, c in enumerate(spec):
        start, n, samples = _chunk(c)
        nb = -(-(start + n) // block_size)
        blocks = list(range(next_block, next_block + nb))
        next_block += nb
        ids = [rng.randrange(256, vocab_size) for _ in range(n)]
        chunks.append(ScheduledChunk(f"p{i}", ids, start, blocks, greedy if samples else None))
    return ScheduledBatch(chunks=chunks)


def describe_shapes(specs: Iterable[Spec]) -> list[str]:
    out = []
    for spec in specs:
        chunks = [_chunk(c) for c in spec]
        dec = [s + n for s, n, _ in chunks if n == 1]
        parts = []
        if dec:
            parts.append(f"{len(dec)} decode (ctx ~{int(statistics.mean(dec))})")
        for s, n, samples in chunks:
            if n > 1:
                parts.append(f"prefill {n} @ {s}" + ("" if samples else " (no sample)"))
        out.append(" + ".join(parts))
    return out


# -- measuring ------------------------------------------------------------------------------
def measure(runner, batch: ScheduledBatch, reps: int, timer: Timer = time.perf_counter) -> float:
    """The fastest of `reps` runs of `batch`."""
    return min(_runs(runner, batch, reps, timer))


def _runs(runner, batch: ScheduledBatch, reps: int, timer: Timer) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = timer()
        runner.execute(batch)
        times.append(timer() - t0)
    return times


def measure_grid(
    engine, specs: list[Spec], reps: int, timer: Timer, progress: bool, seed: int = 0
) -> tuple[list[float], Noise]:
    """Each shape's fastest run, and the noise seen: the spread of every shape's runs and the
    reference step before, halfway through and after the grid."""
    from tqdm import tqdm

    rng = random.Random(seed)
    bs, vocab, runner = engine.config.cache.block_size, engine.tokenizer.vocab_size, engine.runner
    capacity = engine.config.cache.num_blocks * bs
    fitting = [r for r in REFERENCES if _fits(r, engine.max_model_len, capacity)]
    reference = make_batch(fitting[0] if fitting else REFERENCES[-1], bs, vocab, rng)
    runner.execute(make_batch([(0, 64)], bs, vocab, rng))  # warm-up
    # more runs than a shape gets: one burst of other work must not pass for a drift
    ref_reps = REFERENCE_RUNS * reps
    ref = [min(_runs(runner, reference, ref_reps, timer))]
    fastest: list[float] = []
    spreads: list[float] = []
    bar = tqdm(specs, desc="profiling step latency", unit="shape", disable=not progress)
    for i, spec in enumerate(bar):
        if i == len(specs) // 2:
            ref.append(min(_runs(runner, reference, ref_reps, timer)))
        runs = _runs(runner, make_batch(spec, bs, vocab, rng), reps, timer)
        fastest.append(min(runs))
        spreads.append((max(runs) - min(runs)) / max(min(runs), 1e-9))
    ref.append(min(_runs(runner, reference, ref_reps, timer)))
    return fastest, Noise(spreads, ref)


# -- building -------------------------------------------------------------------------------
def build_profile(
    engine,
    reps: int = MIN_REPS,
    progress: bool = True,
    heldout_count: int = HELDOUT_COUNT,
    timer: Timer = time.perf_counter,
    retries: int = NOISE_RETRIES,
) -> ProfileReport:
    """Measure the grids (again, up to `retries` times, while the machine looks noisy), keep
    each shape's fastest run over all attempts, fit. Raises NoisyMachineError (carrying the
    report) when the last attempt was still noisy. The held-out bound is left to the caller
    (`ProfileReport.within_bound`)."""
    if reps < MIN_REPS:
        raise ValueError(f"a profile needs at least {MIN_REPS} runs per shape, not {reps}")
    t0 = timer()
    capacity = engine.config.cache.num_blocks * engine.config.cache.block_size
    train = training_grid(engine.max_model_len, capacity)
    held = heldout_grid(engine.max_model_len, capacity, heldout_count)
    best: list[float] | None = None
    for attempt in range(1, retries + 2):
        times, noise = measure_grid(engine, train + held, reps, timer, progress, seed=attempt)
        best = times if best is None else [min(a, b) for a, b in zip(best, times, strict=True)]
        if not noise.noisy:
            break
        if attempt <= retries:
            log.warning(
                "step times too noisy to trust (%s): measuring again (%d of %d retries)",
                noise.describe(),
                attempt,
                retries,
            )
    report = _fit_report(engine, train, held, best, noise, timer() - t0)
    report.attempts = attempt
    if noise.noisy:
        raise NoisyMachineError(_noisy_message(report, len(train) + len(held), reps), report)
    return report


def _fit_report(
    engine, train: list[Spec], held: list[Spec], times: list[float], noise: Noise, seconds: float
) -> ProfileReport:
    train_shapes = [shape_of(s) for s in train]
    held_shapes = [shape_of(s) for s in held]
    train_times, held_times = times[: len(train)], times[len(train) :]
    meta = {
        "model": engine.model_name,
        "dtype": engine.config.dtype,
        "device": engine.config.device,
        "device_name": device_name(engine.config.device),
        "threads": engine.config.num_threads,
        "created": time.time(),
        "median_spread": noise.median_spread,
        "reference_drift": noise.drift,
    }
    model = LatencyModel.fit(train_shapes, train_times, meta)
    heldout = [(s, t, model.predict(s)) for s, t in zip(held_shapes, held_times, strict=True)]
    report = ProfileReport(
        model,
        model.errors(train_shapes, train_times),
        model.errors(held_shapes, held_times),
        heldout,
        seconds,
        describe_shapes(held),
        noise,
    )
    model.meta["heldout_median_error"] = report.heldout_median_error
    return report


def _noisy_message(report: ProfileReport, shapes: int, reps: int) -> str:
    return (
        f"the machine is too busy or noisy to profile step latency: {shapes} batch shapes "
        f"timed {reps} times each, {report.attempts} time(s) over; {report.noise.describe()}. "
        "Stop other work on this machine and run `conserve profile` again, or pass "
        "`--latency-profile FILE` with a profile made on a quiet machine of the same kind."
    )


def load_or_build(
    engine,
    progress: bool = True,
    on_build: Callable[[ProfileReport], None] | None = None,
    timer: Timer = time.perf_counter,
    retries: int = START_RETRIES,
) -> LatencyModel:
    """The cached profile for this engine, measured now if there is none. Never fails for
    a noisy machine or a profile off its bound: that profile is used, not cached (the next
    start measures again), and the online refit corrects it while serving."""
    model = cached_profile(engine)
    if model is not None:
        return model
    log.warning(
        "no latency profile for this model and machine yet: measuring one (a minute or two)"
    )
    try:
        report = build_profile(engine, progress=progress, timer=timer, retries=retries)
    except NoisyMachineError as e:
        report = e.report
        log.warning("%s", e)
        log.warning(_not_cached(report, "the machine was noisy"))
    else:
        if report.within_bound:
            path = profile_path(engine)
            report.model.save(path)
            log.warning("latency profile saved to %s (%s)", path, report.summary())
        else:
            log.warning(_not_cached(report, "its held-out error is above the bound"))
    if on_build is not None:
        on_build(report)
    return report.model


def _not_cached(report: ProfileReport, why: str) -> str:
    return (
        f"LATENCY PROFILE NOT CACHED: {why} ({report.summary()}). Serving with it anyway: "
        "the online refit corrects it from the steps served, and the next start measures "
        "again. Run `conserve profile` on a quiet machine to cache a good one."
    )


# -- checking -------------------------------------------------------------------------------
@dataclass
class CheckReport:
    """A profile's predictions against step times measured now, on shapes it has not seen."""

    descriptions: list[str]
    measured: list[float]
    predicted: list[float]
    noise: Noise
    bound: float

    @property
    def errors(self) -> np.ndarray:
        y = np.asarray(self.measured)
        return np.abs(np.asarray(self.predicted) - y) / y

    @property
    def median_error(self) -> float:
        return float(np.median(self.errors))

    @property
    def p90_error(self) -> float:
        return float(np.percentile(self.errors, 90))

    @property
    def within_bound(self) -> bool:
        return self.median_error <= self.bound

    def markdown(self) -> str:
        from conserve.tables import md_table

        rows = [
            [d, f"{t * 1e3:.1f}", f"{p * 1e3:.1f}", f"{(p - t) / t * 100:+.1f}%"]
            for d, t, p in zip(self.descriptions, self.measured, self.predicted, strict=True)
        ]
        verdict = "within" if self.within_bound else "ABOVE"
        lines = [
            md_table(["shape", "measured ms", "predicted ms", "error"], rows),
            "",
            f"median error {self.median_error * 100:.1f}%, p90 {self.p90_error * 100:.1f}%: "
            f"{verdict} the bound of {self.bound * 100:.0f}% (median).",
            f"Measured with {self.noise.describe()}"
            + (
                ": the machine was noisy, so the measurement is suspect too."
                if self.noise.noisy
                else "."
            ),
        ]
        return "\n".join(lines)


def check_profile(
    engine,
    model: LatencyModel,
    reps: int = MIN_REPS,
    count: int = HELDOUT_COUNT,
    seed: int = CHECK_SEED,
    timer: Timer = time.perf_counter,
    progress: bool = True,
    bound: float = MAX_HELDOUT_ERROR,
) -> CheckReport:
    """Time a fresh held-out grid (`seed`: other shapes than the profile's own held-out
    ones) now and compare `model`'s predictions with it."""
    capacity = engine.config.cache.num_blocks * engine.config.cache.block_size
    specs = heldout_grid(engine.max_model_len, capacity, count, seed)
    times, noise = measure_grid(engine, specs, reps, timer, progress, seed=seed)
    predicted = [model.predict(shape_of(s)) for s in specs]
    return CheckReport(describe_shapes(specs), times, predicted, noise, bound)
