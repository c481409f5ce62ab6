"""The profiler on a fake runner and a fake clock: noisy machines are measured again and then
refused, profiles off the error bound are never cached, profiles are keyed by the machine,
`load_or_build` never fails a server start; `conserve profile --check` on a tiny model; and
the test session's caches live in a temporary directory."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conserve.engine import profiler
from conserve.engine.latency import FEATURES, BatchShape, LatencyModel
from conserve.engine.profiler import (
    MAX_HELDOUT_ERROR,
    NOISE_RETRIES,
    NoisyMachineError,
    build_profile,
    heldout_grid,
    load_or_build,
    load_profile,
    profile_path,
    shape_of,
    training_grid,
)
from conserve.paths import cache_dir
from conserve.platform import device_name

# as tests/conftest.py set them for the session (the fixture below narrows them per test)
SESSION_ENV = {v: os.environ.get(v) for v in ("CONSERVE_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME")}
TRUE = np.array([0.030, 3e-4, 1e-4, 1.5e-4, 1e-6, 5e-4, 5e-5])  # seconds, per FEATURES


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRunner:
    """Advances the clock by a step's true time (TRUE, or `law`) times `factor()`."""

    def __init__(self, clock: Clock, factor=lambda: 1.0, law=None) -> None:
        self.clock, self.factor, self.law = clock, factor, law
        self.calls = 0
        self.kernels = None

    def execute(self, batch):
        self.calls += 1
        shape = BatchShape()
        for c in batch.chunks:
            shape.add(c.start, c.num_tokens, c.sample is not None)
        seconds = self.law(shape) if self.law else float(TRUE @ shape.vector())
        self.clock.t += seconds * self.factor()


def fake_engine(tmp_path: Path, runner: FakeRunner, name: str = "fake") -> SimpleNamespace:
    source = tmp_path / f"{name}.gguf"
    source.write_bytes(b"weights")
    config = SimpleNamespace(
        dtype="float32",
        device="cpu",
        num_threads=2,
        layers="auto",
        latency_profile="auto",
        cache=SimpleNamespace(num_blocks=40_000, block_size=16),
    )
    return SimpleNamespace(
        config=config,
        runner=runner,
        max_model_len=4096,
        tokenizer=SimpleNamespace(vocab_size=1000),
        model_name=name,
        model_source=str(source),
    )


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own cache directory (inside the session's temporary one is not enough:
    tests here count measurements, so no profile may be left by another test)."""
    monkeypatch.setenv("CONSERVE_CACHE_DIR", str(tmp_path / "cache"))


def noisy(seed: int = 0, spread: float = 0.6):
    rng = random.Random(seed)
    return lambda: 1.0 + spread * rng.random()


def quiet_after(calls: int, seed: int = 0):
    """Noisy for the first `calls` runs, then quiet."""
    rng, n = random.Random(seed), [0]

    def factor() -> float:
        n[0] += 1
        return 1.0 + 0.6 * rng.random() if n[0] <= calls else 1.0

    return factor


def runs_per_attempt(engine) -> int:
    cap = engine.config.cache.num_blocks * engine.config.cache.block_size
    shapes = len(training_grid(engine.max_model_len, cap)) + len(
        heldout_grid(engine.max_model_len, cap)
    )
    reference = 3 * profiler.REFERENCE_RUNS * profiler.MIN_REPS  # start, middle, end
    return 1 + shapes * profiler.MIN_REPS + reference  # and a warm-up


# -- measuring and judging ------------------------------------------------------------------
def test_a_quiet_machine_is_accepted_and_the_fit_recovers_the_step_costs(tmp_path):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    report = build_profile(engine, progress=False, timer=clock)
    assert report.attempts == 1
    assert engine.runner.calls == runs_per_attempt(engine)
    assert report.noise.median_spread < 1e-9 and report.noise.drift < 1e-9
    assert np.allclose(report.model.coef, TRUE, rtol=1e-6)
    assert report.within_bound and report.heldout_median_error < 1e-6
    assert report.model.meta["device_name"] == device_name("cpu")


def test_a_noisy_machine_is_measured_again_then_refused(tmp_path):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock, noisy()))
    with pytest.raises(NoisyMachineError) as err:
        build_profile(engine, progress=False, timer=clock)
    report = err.value.report
    assert report.attempts == 1 + NOISE_RETRIES
    assert engine.runner.calls == (1 + NOISE_RETRIES) * runs_per_attempt(engine)
    assert report.noise.median_spread > profiler.MAX_MEDIAN_SPREAD
    message = str(err.value)
    assert "spread" in message and "--latency-profile FILE" in message
    assert "Stop other work" in message


def test_noise_that_passes_is_retried_and_then_accepted(tmp_path):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    engine.runner.factor = quiet_after(runs_per_attempt(engine))
    report = build_profile(engine, progress=False, timer=clock)
    assert report.attempts == 2
    # every shape keeps its fastest run over both attempts: the quiet one
    assert np.allclose(report.model.coef, TRUE, rtol=1e-6)


def test_a_machine_that_slows_down_during_the_profile_is_refused(tmp_path):
    """Each shape's runs agree (they follow each other), but the reference step drifts."""
    clock = Clock()
    calls = [0]

    def slowing() -> float:
        calls[0] += 1
        return 1.0 + 1e-3 * calls[0]

    engine = fake_engine(tmp_path, FakeRunner(clock, slowing))
    with pytest.raises(NoisyMachineError) as err:
        build_profile(engine, progress=False, timer=clock, retries=0)
    noise = err.value.report.noise
    assert noise.median_spread < profiler.MAX_MEDIAN_SPREAD
    assert noise.drift > profiler.MAX_REFERENCE_DRIFT
    assert "drift" in str(err.value)


def test_fewer_than_three_runs_per_shape_are_refused(tmp_path):
    clock = Clock()
    with pytest.raises(ValueError, match="at least 3"):
        build_profile(fake_engine(tmp_path, FakeRunner(clock)), reps=2, timer=clock)


def unfittable(shape: BatchShape) -> float:
    """Step times no linear model fits: each shape 0.3x to 3x its linear time."""
    key = (shape.tokens, shape.decode_ctx, shape.seqs, shape.sampled)
    return float(TRUE @ shape.vector()) * random.Random(hash(key)).uniform(0.3, 3.0)


# -- load_or_build: the server start --------------------------------------------------------
def test_load_or_build_measures_once_and_then_reads_the_cache(tmp_path):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    first = load_or_build(engine, progress=False, timer=clock)
    assert profile_path(engine).exists()
    calls = engine.runner.calls
    assert calls == runs_per_attempt(engine)
    second = load_or_build(engine, progress=False, timer=clock)
    assert engine.runner.calls == calls  # read, not measured
    assert np.allclose(second.coef, first.coef)
    assert second.meta["device_name"] == device_name("cpu")


def test_a_noisy_start_serves_the_profile_without_caching_it(tmp_path, caplog):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock, noisy(spread=0.3)))
    with caplog.at_level(logging.WARNING, logger="conserve.engine.profiler"):
        model = load_or_build(engine, progress=False, timer=clock)
    assert engine.runner.calls == runs_per_attempt(engine)  # no retries at start
    assert not profile_path(engine).exists()
    assert "NOT CACHED" in caplog.text and "noisy" in caplog.text
    # the best it measured: each shape's fastest of three runs, so near the truth
    shapes = [shape_of(s) for s in heldout_grid(4096, 640_000, seed=5)]
    assert np.median(model.errors(shapes, [float(TRUE @ s.vector()) for s in shapes])) < 0.15


def test_a_profile_above_the_error_bound_is_served_but_not_cached(tmp_path, caplog):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock, law=unfittable))
    with caplog.at_level(logging.WARNING, logger="conserve.engine.profiler"):
        model = load_or_build(engine, progress=False, timer=clock)
    assert isinstance(model, LatencyModel)
    assert model.meta["heldout_median_error"] > MAX_HELDOUT_ERROR
    assert not profile_path(engine).exists()
    assert "NOT CACHED" in caplog.text and "above the bound" in caplog.text
    calls = engine.runner.calls
    load_or_build(engine, progress=False, timer=clock)
    assert engine.runner.calls == 2 * calls  # the next start measures again


def test_a_cached_profile_from_another_device_is_not_used(tmp_path, caplog):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    foreign = LatencyModel(TRUE * 5, {"device_name": "Some Other CPU x64"})
    foreign.save(profile_path(engine))
    with caplog.at_level(logging.WARNING, logger="conserve.engine.profiler"):
        model = load_or_build(engine, progress=False, timer=clock)
    assert engine.runner.calls == runs_per_attempt(engine)  # measured instead
    assert "Some Other CPU x64" in caplog.text
    assert np.allclose(model.coef, TRUE, rtol=1e-6)
    assert LatencyModel.load(profile_path(engine)).meta["device_name"] == device_name("cpu")


def test_profiles_are_keyed_by_the_device_name(tmp_path, monkeypatch):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    load_or_build(engine, progress=False, timer=clock)
    here = profile_path(engine)
    monkeypatch.setattr(profiler, "device_name", lambda device: "Another CPU x2")
    assert profile_path(engine) != here
    calls = engine.runner.calls
    load_or_build(engine, progress=False, timer=clock)
    assert engine.runner.calls == 2 * calls  # another machine: measured, not reused


def test_profiles_are_keyed_by_the_compute_path(tmp_path):
    """Steps run faster or slower with other kernels: a profile made with the compiled kernels
    of one build is not used with another build, with torch, or with another --layers."""
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    paths = {profile_path(engine)}
    engine.runner.kernels = SimpleNamespace(fingerprint="build-a")
    paths.add(profile_path(engine))
    engine.runner.kernels = SimpleNamespace(fingerprint="build-b")
    paths.add(profile_path(engine))
    engine.config.layers = "torch"
    paths.add(profile_path(engine))
    assert len(paths) == 4


def test_an_unreadable_profile_is_ignored(tmp_path, caplog):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    path = profile_path(engine)
    path.parent.mkdir(parents=True)
    path.write_text('{"features": ["const"], "coef": ')
    with caplog.at_level(logging.WARNING, logger="conserve.engine.profiler"):
        model = load_or_build(engine, progress=False, timer=clock)
    assert "unreadable" in caplog.text
    assert engine.runner.calls == runs_per_attempt(engine)
    assert np.allclose(model.coef, TRUE, rtol=1e-6)
    assert LatencyModel.load(path).meta["device_name"] == device_name("cpu")  # replaced


def test_an_explicit_profile_from_another_device_loads_with_a_warning(tmp_path, caplog):
    clock = Clock()
    engine = fake_engine(tmp_path, FakeRunner(clock))
    path = tmp_path / "theirs.json"
    LatencyModel(TRUE * 2, {"device_name": "Some Other CPU x64"}).save(path)
    with caplog.at_level(logging.WARNING, logger="conserve.engine.profiler"):
        model = load_profile(engine, str(path))
    assert np.allclose(model.coef, TRUE * 2)
    assert "Some Other CPU x64" in caplog.text
    assert engine.runner.calls == 0


# -- the grids ------------------------------------------------------------------------------
def _kinds(specs) -> set[str]:
    kinds = set()
    for spec in specs:
        decodes = [c for c in spec if c[1] == 1]
        chunks = [c for c in spec if c[1] > 1]
        if len(decodes) >= 16 and any(10 <= c[1] <= 600 for c in chunks):
            kinds.add("online chunk beside offline decodes")
        if len(decodes) >= 16 and any(len(c) > 2 and not c[2] for c in chunks):
            kinds.add("unsampled offline chunk beside decodes")
        if len(decodes) >= 64 and not chunks and max(c[0] for c in decodes) >= 1000:
            kinds.add("many decodes at long context")
    return kinds


def test_both_grids_cover_the_steps_co_serving_runs():
    train = training_grid(8192, 180_000)
    held = heldout_grid(8192, 180_000)
    everything = {
        "online chunk beside offline decodes",
        "unsampled offline chunk beside decodes",
        "many decodes at long context",
    }
    assert _kinds(train) == everything
    assert _kinds(held) == everything
    seen = {tuple(shape_of(s).vector()) for s in train}
    assert not any(tuple(shape_of(s).vector()) in seen for s in held)
    check = heldout_grid(8192, 180_000, seed=profiler.CHECK_SEED)
    assert [shape_of(s).vector().tolist() for s in check] != [
        shape_of(s).vector().tolist() for s in held
    ]


def test_grids_keep_to_the_context_window_and_the_cache():
    for spec in training_grid(1024, 20_000) + heldout_grid(1024, 20_000):
        assert all(c[0] + c[1] <= 1024 for c in spec)
        assert sum(c[0] + c[1] for c in spec) <= 20_000
    assert len(heldout_grid(64, 100)) < profiler.HELDOUT_COUNT  # gives up, does not spin


# -- tests never write outside temporary directories ----------------------------------------
def test_the_session_caches_live_in_a_temporary_directory(cache_root, monkeypatch, tmp_path):
    assert cache_root.is_dir() and not cache_root.is_relative_to(Path.home())
    for var, value in SESSION_ENV.items():
        assert value and Path(value).is_relative_to(cache_root), var
    monkeypatch.setenv("CONSERVE_CACHE_DIR", SESSION_ENV["CONSERVE_CACHE_DIR"])
    assert cache_dir().is_relative_to(cache_root)
    engine = fake_engine(tmp_path, FakeRunner(Clock()))
    assert profile_path(engine).is_relative_to(cache_root)  # where a server start looks
    monkeypatch.delenv("CONSERVE_CACHE_DIR")  # XDG_CACHE_HOME alone still lands inside
    assert cache_dir().is_relative_to(cache_root)


# -- conserve profile --check ---------------------------------------------------------------
def tiny_args(folder: Path) -> list[str]:
    return ["--model", str(folder), "--dtype", "float32", "--kv-cache-gb", "0.05"]


def absurd_profile(path: Path) -> Path:
    coef = np.zeros(len(FEATURES))
    coef[FEATURES.index("const")] = 1000.0  # every step predicted at 1000 s
    LatencyModel(coef, {"device_name": device_name("cpu")}).save(path)
    return path


def test_profile_check_exit_status_and_table(tiny_llama_dir, tmp_path, capsys):
    from conserve.cli import build_parser, main
    from conserve.engine.engine import Engine
    from conserve.engine_args import engine_config

    args = tiny_args(tiny_llama_dir) + ["--heldout-count", "4"]
    assert main(["profile", "--check", *args]) == 2  # nothing cached yet
    assert "no latency profile to check" in capsys.readouterr().err

    theirs = absurd_profile(tmp_path / "absurd.json")
    assert main(["profile", "--check", "--latency-profile", str(theirs), *args]) == 1
    out = capsys.readouterr().out
    assert "measured ms" in out and "predicted ms" in out and "ABOVE" in out
    assert out.count("decode") + out.count("prefill") >= 4  # one row per shape

    # the cached one, where the engine looks for it; judged against a bound it meets
    cfg = engine_config(build_parser().parse_args(["profile", *tiny_args(tiny_llama_dir)]))
    engine = Engine.from_config(replace(cfg, scheduler=replace(cfg.scheduler, policy="fcfs")))
    cached = absurd_profile(profile_path(engine))
    assert main(["profile", "--check", "--max-error", "1e9", *args]) == 0
    out = capsys.readouterr().out
    assert str(cached) in out and "within the bound" in out
    assert "median error" in out and "p90" in out
