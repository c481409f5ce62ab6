"""The latency model: the fit, the refit schedule, and an online refit that corrects a wrong
profile within a bounded number of steps without being thrown by outlying steps."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conserve.engine import latency as lat
from conserve.engine.latency import FEATURES, BatchShape, LatencyModel, refit_due
from conserve.engine.profiler import shape_of, training_grid


def coefs(**kw: float) -> np.ndarray:
    c = np.zeros(len(FEATURES))
    for name, value in kw.items():
        c[FEATURES.index(name)] = value
    return c


# A small CPU model's step costs, roughly (SmolLM2-135M on two cores)
TRUE = coefs(
    const=0.040,
    tokens=3.4e-4,
    tokens_small=1e-4,
    sampled=1.5e-4,
    decode_ctx=1.0e-6,
    prefill_attn=5e-4,
    seqs=5e-5,
)
# The wrong profile of the issue: coefficients 2x and 0.5x the truth, 140 ms fixed cost
WRONG = coefs(
    const=0.140,
    tokens=6.8e-4,
    tokens_small=0.5e-4,
    sampled=3e-4,
    decode_ctx=0.5e-6,
    prefill_attn=10e-4,
    seqs=2.5e-5,
)
CONVERGE_STEPS = 256  # N: the refit's median error on fresh shapes is below 5% after these
REFIT = lat.REFIT_EVERY


def grid_shapes() -> list[BatchShape]:
    return [shape_of(s) for s in training_grid(8192, 10**7)]


def profile_of(coef: np.ndarray) -> LatencyModel:
    """A model fitted on the training grid as measured on a machine that runs like `coef`."""
    shapes = grid_shapes()
    return LatencyModel.fit(shapes, [float(coef @ s.vector()) for s in shapes])


def serving_shape(rng: random.Random) -> BatchShape:
    """A co-serving step: online decodes, offline decodes, maybe an online prompt chunk and
    an offline prompt chunk cut by a time limit."""
    s = BatchShape()
    for _ in range(rng.choice([0, 1, 2, 3])):
        s.add(rng.randint(20, 400), 1)
    for _ in range(rng.choice([0, 16, 64, 128, 256])):
        s.add(rng.randint(100, 1500), 1)
    if rng.random() < 0.5 or s.seqs == 0:
        s.add(0, rng.randint(10, 600))
    if rng.random() < 0.3:
        s.add(rng.choice([0, 500]), rng.randint(8, 1500), samples=rng.random() < 0.5)
    return s


def true_time(shape: BatchShape, coef: np.ndarray = TRUE) -> float:
    return float(coef @ shape.vector())


def median_error(model: LatencyModel, shapes: list[BatchShape], coef=TRUE) -> float:
    return float(np.median(model.errors(shapes, [true_time(s, coef) for s in shapes])))


def serve(model: LatencyModel, steps: int, rng: random.Random, outlier_p: float = 0.01):
    """Feed `steps` serving steps timed on the TRUE machine: 5% multiplicative noise, and a
    10x step (a GC pause) with probability `outlier_p`."""
    outliers = 0
    for _ in range(steps):
        shape = serving_shape(rng)
        seconds = true_time(shape) * float(np.exp(rng.gauss(0.0, 0.05)))
        if rng.random() < outlier_p:
            seconds *= 10
            outliers += 1
        model.observe(shape, seconds)
    return outliers


def test_the_fit_recovers_known_coefficients():
    model = profile_of(TRUE)
    assert np.allclose(model.coef, TRUE, rtol=1e-6, atol=1e-12)
    assert median_error(model, [serving_shape(random.Random(i)) for i in range(50)]) < 1e-6


def test_refits_come_at_16_32_64_128_256_steps_then_every_256():
    due = [n for n in range(1, 1100) if refit_due(n)]
    assert due == [16, 32, 64, 128, 256, 512, 768, 1024]
    model = profile_of(TRUE)
    shape = BatchShape().with_chunk(0, 32)
    for n in range(1, 520):
        model.observe(shape, true_time(shape))
        assert model.num_refits == sum(1 for d in due if d <= n)
    assert model.num_observed == 519


def test_the_refit_corrects_a_wrong_profile_within_n_steps():
    model = profile_of(WRONG)
    rng = random.Random(7)
    fresh = [serving_shape(random.Random(1000 + i)) for i in range(200)]
    assert median_error(model, fresh) > 0.5  # the profile is badly wrong to begin with
    outliers = serve(model, CONVERGE_STEPS, rng, outlier_p=0.02)
    assert outliers >= 2  # a few 10x steps were among them
    assert model.num_refits == 5
    assert median_error(model, fresh) < 0.05
    # and it stays there as serving goes on
    serve(model, 2 * REFIT, rng, outlier_p=0.02)
    assert median_error(model, fresh) < 0.05


def test_outlying_steps_do_not_wreck_the_fit():
    """A bare-coefficient model 1.5x off (so its prior hardly speaks after 256 steps) serves
    steps of which one in 30 is a 10x pause and another in 30 is timed 10x too short. The
    short ones alone would pull a plain relative-error fit off by more than half."""
    model = LatencyModel(TRUE * 1.5)
    rng = random.Random(3)
    fresh = [serving_shape(random.Random(2000 + i)) for i in range(200)]
    for i in range(REFIT):
        shape = serving_shape(rng)
        factor = 10.0 if i % 30 == 7 else 0.1 if i % 30 == 22 else 1.0
        model.observe(shape, true_time(shape) * factor * float(np.exp(rng.gauss(0.0, 0.05))))
    assert median_error(model, fresh) < 0.03
    one = BatchShape().with_chunk(0, 1)
    assert 0.9 < model.predict(one) / true_time(one) < 1.1


def test_the_prior_still_decides_shapes_the_steps_do_not_cover():
    """Only decode steps are served, on a machine whose attention over the context costs
    twice what the profile says: decodes follow the machine, long prompts keep the profile
    (which is right about them)."""
    machine = TRUE.copy()
    machine[FEATURES.index("decode_ctx")] *= 2
    model = profile_of(TRUE)
    rng = random.Random(5)
    for _ in range(4 * REFIT):
        shape = BatchShape()
        for _ in range(rng.choice([1, 8, 32, 96, 200])):
            shape.add(rng.randint(100, 1500), 1)
        model.observe(shape, true_time(shape, machine))
    decodes = [shape_of([(rng.randint(100, 1500), 1)] * b) for b in (4, 32, 128, 256)]
    prompts = [shape_of([(start, n)]) for start in (0, 1000) for n in (64, 512, 2000)]
    assert median_error(model, decodes, machine) < 0.02
    assert median_error(model, prompts, TRUE) < 0.02


def test_observe_ignores_steps_with_no_time():
    model = profile_of(TRUE)
    before = model.coef.copy()
    for _ in range(40):
        model.observe(BatchShape().with_chunk(0, 8), 0.0)
    assert model.num_observed == 0 and model.num_refits == 0
    assert np.array_equal(model.coef, before)


def test_a_profile_round_trips_through_its_file(tmp_path):
    model = profile_of(TRUE)
    model.meta["device_name"] = "Some CPU x8"
    path = tmp_path / "p.json"
    model.save(path)
    back = LatencyModel.load(path)
    assert np.allclose(back.coef, model.coef) and back.meta == model.meta
    # its prior came along: a refit still knows the prompt shapes decode steps do not cover
    for _ in range(16):
        back.observe(shape_of([(99, 1)] * 8), true_time(shape_of([(99, 1)] * 8)))
    assert back.num_refits == 1
    assert median_error(back, [shape_of([(0, 1024)])]) < 0.02


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        "{",
        '{"coef": [1]}',
        json.dumps({"features": list(FEATURES), "coef": [1.0]}),
        json.dumps({"features": list(FEATURES), "coef": [0.0] * len(FEATURES), "profile_x": [[1]]}),
        json.dumps(
            {
                "features": list(FEATURES),
                "coef": [0.0] * len(FEATURES),
                "profile_x": [[1.0] * len(FEATURES)],
                "profile_y": [1.0, 2.0],
            }
        ),
    ],
)
def test_malformed_profiles_are_rejected_with_a_value_or_key_error(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises((ValueError, KeyError)):
        LatencyModel.load(path)
