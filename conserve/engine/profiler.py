"""Measure step times over a grid of batch shapes and fit the latency model.

The profile runs synthetic batches straight through the model runner (random token ids,
disjoint KV blocks), so it needs no requests and leaves the scheduler untouched. It is cached on
disk per model file, dtype, device, thread count, attention implementation and block size.
"""

from __future__ import annotations

import hashlib
import logging
import random
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conserve.engine.batch import ScheduledBatch, ScheduledChunk
from conserve.engine.latency import BatchShape, LatencyModel
from conserve.paths import cache_dir
from conserve.sampling.params import SamplingParams
from conserve.sampling.types import SampleSpec

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
# (start, num_tokens) per sequence
Spec = list[tuple[int, int]]


@dataclass
class ProfileReport:
    model: LatencyModel
    train_errors: np.ndarray
    heldout_errors: np.ndarray
    heldout: list[tuple[BatchShape, float, float]]  # shape, measured, predicted
    seconds: float
    descriptions: list[str]  # of the held-out shapes

    def summary(self) -> str:
        h = self.heldout_errors
        return (
            f"held-out shapes: {len(h)}, median abs error {np.median(h) * 100:.1f}%, "
            f"p90 {np.percentile(h, 90) * 100:.1f}%, max {h.max() * 100:.1f}%; "
            f"training shapes: {len(self.train_errors)}, median "
            f"{np.median(self.train_errors) * 100:.1f}%"
        )

    def as_dict(self) -> dict:
        return {
            "model": self.model.to_json(),
            "heldout": [
                {"shape": s.as_dict(), "measured_s": t, "predicted_s": p}
                for s, t, p in self.heldout
            ],
            "heldout_median_error": float(np.median(self.heldout_errors)),
            "train_median_error": float(np.median(self.train_errors)),
            "seconds": self.seconds,
        }


def report_markdown(report: ProfileReport, engine, info: dict | None = None) -> str:
    from conserve.engine.latency import FEATURES
    from conserve.tables import md_table

    lines = ["# Step latency profile", ""]
    if info:
        lines += [f"- {k}: {v}" for k, v in info.items()] + [""]
    lines += [
        f"Model {engine.model_name}, {engine.config.dtype}, {engine.config.device}, "
        f"{engine.config.num_threads} threads; profiled in {report.seconds:.0f} s.",
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


def profile_path(engine) -> Path:
    cfg = engine.config
    src = Path(getattr(engine, "model_source", "") or engine.model_name)
    try:
        st = src.stat()
        ident = f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        ident = str(src)
    attention = "kernel" if getattr(engine.runner, "kernels", None) is not None else "torch"
    key = (
        f"v{PROFILE_VERSION}|{ident}|{cfg.dtype}|{cfg.device}|{cfg.num_threads}|{attention}|"
        f"{cfg.cache.block_size}"
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "profiles" / f"{engine.model_name}-{cfg.dtype}-{digest}.json"


def training_grid(max_len: int, capacity: int) -> list[Spec]:
    """Shapes the fit is made from: pure decode, single and multiple prefill chunks, mixes."""
    specs: list[Spec] = []
    for ctx in (32, 256, 1024):
        for b in (1, 2, 4, 8, 16, 32, 64, 128):
            specs.append([(ctx - 1, 1)] * b)
    for start in (0, 1024):
        for n in (2, 16, 64, 128, 256, 512, 1024):
            specs.append([(start, n)])
    specs.append([(0, 2048)])
    for n, k in ((64, 4), (128, 8), (256, 4), (32, 16)):
        specs.append([(0, n)] * k)
    for b, ctx in ((4, 256), (16, 512), (32, 128)):
        for start, n in ((0, 64), (0, 512), (1024, 256)):
            specs.append([(ctx - 1, 1)] * b + [(start, n)])
    return [s for s in specs if _fits(s, max_len, capacity)]


def heldout_grid(max_len: int, capacity: int, count: int = 20, seed: int = 1) -> list[Spec]:
    """Random serving-like shapes, none of them on the training grid."""
    rng = random.Random(seed)
    specs: list[Spec] = []
    while len(specs) < count:
        b = rng.choice([0, 1, 3, 6, 12, 24, 48, 96])
        spec = [(rng.randint(16, 900), 1) for _ in range(b)]
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            spec.append((rng.choice([0, 0, 300, 700, 1200]), rng.randint(8, 1200)))
        if spec and _fits(spec, max_len, capacity):
            specs.append(spec)
    return specs


def _fits(spec: Spec, max_len: int, capacity: int) -> bool:
    return all(s + n <= max_len for s, n in spec) and sum(s + n for s, n in spec) <= capacity


def shape_of(spec: Spec) -> BatchShape:
    shape = BatchShape()
    for start, n in spec:
        shape.add(start, n)
    return shape


def make_batch(spec: Spec, block_size: int, vocab_size: int, rng: random.Random) -> ScheduledBatch:
    chunks = []
    next_block = 0
    greedy = SampleSpec(SamplingParams(temperature=0.0, max_tokens=1))
    for i, (start, n) in enumerate(spec):
        nb = -(-(start + n) // block_size)
        blocks = list(range(next_block, next_block + nb))
        next_block += nb
        ids = [rng.randrange(256, vocab_size) for _ in range(n)]
        chunks.append(ScheduledChunk(f"p{i}", ids, start, blocks, greedy))
    return ScheduledBatch(chunks=chunks)


def measure(runner, batch: ScheduledBatch, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.execute(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_profile(
    engine,
    reps: int = 2,
    progress: bool = True,
    heldout_count: int = 20,
) -> ProfileReport:
    from tqdm import tqdm

    t0 = time.perf_counter()
    capacity = engine.config.cache.num_blocks * engine.config.cache.block_size
    train = training_grid(engine.max_model_len, capacity)
    held = heldout_grid(engine.max_model_len, capacity, heldout_count)
    rng = random.Random(0)
    vocab = engine.tokenizer.vocab_size
    bs = engine.config.cache.block_size
    runner = engine.runner
    runner.execute(make_batch([(0, 64)], bs, vocab, rng))  # warm-up
    results: list[float] = []
    specs = train + held
    bar = tqdm(specs, desc="profiling step latency", unit="shape", disable=not progress)
    for spec in bar:
        results.append(measure(runner, make_batch(spec, bs, vocab, rng), reps))
    train_shapes = [shape_of(s) for s in train]
    held_shapes = [shape_of(s) for s in held]
    meta = {
        "model": engine.model_name,
        "dtype": engine.config.dtype,
        "device": engine.config.device,
        "threads": engine.config.num_threads,
        "created": time.time(),
    }
    model = LatencyModel.fit(train_shapes, results[: len(train)], meta)
    held_times = results[len(train) :]
    heldout = [(s, t, model.predict(s)) for s, t in zip(held_shapes, held_times, strict=True)]
    report = ProfileReport(
        model,
        model.errors(train_shapes, results[: len(train)]),
        model.errors(held_shapes, held_times),
        heldout,
        time.perf_counter() - t0,
        describe_shapes(held),
    )
    model.meta["heldout_median_error"] = float(np.median(report.heldout_errors))
    return report


def load_or_build(
    engine, progress: bool = True, on_build: Callable[[ProfileReport], None] | None = None
) -> LatencyModel:
    """The cached profile for this engine, measured now if there is none."""
    path = profile_path(engine)
    if path.exists():
        try:
            return LatencyModel.load(path)
        except (ValueError, KeyError, OSError) as e:
            log.warning("ignoring unreadable latency profile %s: %s", path, e)
    log.warning("no latency profile for this model and machine yet: measuring one (about a minute)")
    report = build_profile(engine, progress=progress)
    report.model.save(path)
    log.warning("latency profile saved to %s (%s)", path, report.summary())
    if on_build is not None:
        on_build(report)
    return report.model


def describe_shapes(specs: Iterable[Spec]) -> list[str]:
    out = []
    for spec in specs:
        dec = [s + n for s, n in spec if n == 1]
        pre = [(s, n) for s, n in spec if n > 1]
        parts = []
        if dec:
            parts.append(f"{len(dec)} decode (ctx ~{int(statistics.mean(dec))})")
        parts += [f"prefill {n} @ {s}" for s, n in pre]
        out.append(" + ".join(parts))
    return out
