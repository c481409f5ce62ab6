"""Sampler: greedy, top-k/top-p/min-p, seeded streams, distribution, logprobs, penalties, params."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from conserve.sampling.params import SamplingParams
from conserve.sampling.sampler import filter_logits, sample, stream_seed
from conserve.sampling.types import SampleSpec

# probabilities 0.5, 0.3, 0.15, 0.05
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def spec(seed_key: tuple[int, int] | None = None, out: list[int] | None = None, **kw: Any):
    return SampleSpec(SamplingParams(**kw), seed_key=seed_key, output_token_ids=out)


def draws(logits: torch.Tensor, n: int, seed: int = 0, **kw: Any) -> list[int]:
    """n seeded draws of one logits row, one distinct stream per draw, in one batch."""
    rows = logits.expand(n, -1).contiguous()
    specs = [spec(seed_key=(seed, i), **kw) for i in range(n)]
    return [t.token_id for t in sample(rows, specs)]


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0], [-5.0, -4.0, -6.0, -4.5]])
    out = sample(logits, [spec(temperature=0)] * 3)
    assert [t.token_id for t in out] == [1, 0, 1]
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_tiny_temperature_counts_as_greedy() -> None:
    logits = torch.tensor([[0.0, 0.1, 0.0]])
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert all(sample(logits, [spec((s, 0), temperature=1e-6)])[0].token_id == 1 for s in range(20))


def test_sample_does_not_modify_the_input_logits() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    before = logits.clone()
    sample(logits, [spec((1, 0), out=[2, 2], top_k=2, frequency_penalty=1.0, logprobs=2)])
    assert torch.equal(logits, before)


def test_top_k_1_is_greedy_even_at_temperature_1() -> None:
    logits = torch.tensor([0.0, 1.0, 0.9, 0.95, 0.5])
    assert set(draws(logits, 200, top_k=1, temperature=1.0)) == {1}


def test_top_k_2_only_yields_the_two_most_likely_tokens() -> None:
    logits = torch.tensor([0.0, 1.0, 0.2, 0.9, 0.5, 0.3])
    assert set(draws(logits, 500, top_k=2)) == {1, 3}


def test_top_k_minus_one_disables_top_k() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert set(draws(LOGITS, 500, top_k=-1)) == {0, 1, 2, 3}


def test_small_top_p_keeps_only_the_most_likely_token() -> None:
    assert set(draws(LOGITS, 300, top_p=0.01)) == {0}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    # masses before each token: 0, 0.5, 0.8, 0.95 -> top_p 0.7 keeps tokens 0 and 1
    assert set(draws(LOGITS, 500, top_p=0.7)) == {0, 1}
    assert set(draws(LOGITS, 500, top_p=0.85)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability() -> None:
    # min_p 0.2: cutoff 0.1 drops token 3 (0.05); min_p 0.5: cutoff 0.25 drops 2 and 3
    assert set(draws(LOGITS, 800, min_p=0.2)) == {0, 1, 2}
    assert set(draws(LOGITS, 800, min_p=0.5)) == {0, 1}


def test_filters_apply_per_row() -> None:
    logits = LOGITS.expand(3, -1).contiguous()
    specs = [spec((0, 0), top_k=1), spec((0, 0), min_p=0.5), spec((0, 0))]
    out = filter_logits(logits, specs)
    finite = torch.isfinite(out)
    assert finite.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, True],
    ]


# A row with top_p = 1 and no top-k must come out unchanged even when a neighbour in the batch
# uses top-k: a float32 cumulative sum reaches 1.0 before the tail of a confident row, so a
# naive top-p mask would cut tokens the row never asked to cut.
def test_row_without_top_k_or_top_p_is_not_filtered_by_its_batch_neighbours() -> None:
    row = torch.tensor([20.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    plain = spec((1, 0))
    alone = filter_logits(row[None, :], [plain])
    assert torch.equal(alone[0], row)
    batched = filter_logits(torch.stack([row, row]), [plain, spec((1, 0), top_k=5)])
    assert torch.isfinite(batched[0]).all(), "tokens with non-zero probability were dropped"
    assert torch.equal(batched[0], alone[0])


def test_same_seed_key_gives_the_same_token_whatever_else_is_in_the_batch() -> None:
    torch.manual_seed(0)
    vocab = 64
    row = torch.randn(vocab)
    others = torch.randn(4, vocab) * 3
    for index in range(25):
        target = spec((1234, index), temperature=0.8)
        alone = sample(row[None, :], [target])[0].token_id
        batch = torch.cat([others[:2], row[None, :], others[2:]])
        specs = [
            spec((7, index), temperature=1.5),
            spec(None, temperature=1.0),
            target,
            spec(temperature=0),
            spec((99, 0), temperature=0.5),
        ]
        assert sample(batch, specs, torch.Generator().manual_seed(index))[2].token_id == alone


def test_different_seed_key_indices_give_varying_tokens() -> None:
    uniform = torch.zeros(16)
    tokens = draws(uniform, 60, seed=5)
    assert len(set(tokens)) >= 8
    assert tokens == draws(uniform, 60, seed=5)  # reproducible
    assert tokens != draws(uniform, 60, seed=6)


def test_stream_seed_mixes_seed_and_index() -> None:
    seeds = {stream_seed(s, i) for s in range(20) for i in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(3, 4) == stream_seed(3, 4)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_seeded_draws_follow_the_softmax_distribution(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    n = 4000
    counts = Counter(draws(logits, n, seed=11, temperature=temperature))
    expected = (logits / temperature).softmax(-1)
    for token in range(5):
        assert counts[token] / n == pytest.approx(float(expected[token]), abs=0.03)


def test_unseeded_draws_follow_the_softmax_distribution() -> None:
    logits = torch.tensor([0.0, 1.0, 0.5])
    n = 4000
    out = sample(logits.expand(n, -1).contiguous(), [spec()] * n, torch.Generator().manual_seed(3))
    counts = Counter(t.token_id for t in out)
    for token, p in enumerate(logits.softmax(-1).tolist()):
        assert counts[token] / n == pytest.approx(p, abs=0.03)


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.0, 0.0], [1.0, 1.5, 0.2, -0.3, 0.9]])
    specs = [
        spec(temperature=0, logprobs=3, out=[1], presence_penalty=2.0),
        spec((5, 0), temperature=0.7, top_k=2, logprobs=0),
    ]
    out = sample(logits, specs)
    expected = torch.log_softmax(logits, dim=-1)
    greedy = out[0]
    assert greedy.token_id == 3  # the penalty moved greedy off token 1 ...
    assert greedy.logprob == pytest.approx(float(expected[0, 3]))  # ... not the logprobs
    assert [tid for tid, _ in greedy.top_logprobs] == [1, 3, 0]
    assert [lp for _, lp in greedy.top_logprobs] == pytest.approx(
        sorted(expected[0].tolist(), reverse=True)[:3]
    )
    sampled = out[1]
    assert sampled.token_id in (0, 1)
    assert sampled.logprob == pytest.approx(float(expected[1, sampled.token_id]))
    assert sampled.top_logprobs == []


def test_logprobs_only_for_rows_that_ask() -> None:
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = sample(logits, [spec(temperature=0), spec(temperature=0, logprobs=1)])
    assert out[0].logprob is None
    assert out[1].logprob == pytest.approx(float(torch.log_softmax(logits[1], -1)[0]))
    assert len(out[1].top_logprobs) == 1


def test_presence_penalty_moves_greedy_off_a_repeated_token() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0, 0.0]])
    assert sample(logits, [spec(temperature=0, out=[0], presence_penalty=0.0)])[0].token_id == 0
    assert sample(logits, [spec(temperature=0, out=[0], presence_penalty=0.5)])[0].token_id == 1
    # a penalty on tokens not generated changes nothing
    assert sample(logits, [spec(temperature=0, out=[2], presence_penalty=2.0)])[0].token_id == 0


def test_frequency_penalty_grows_with_the_count() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    once = spec(temperature=0, out=[0, 2], frequency_penalty=0.06)  # 2.0 - 0.06 > 1.9
    twice = spec(temperature=0, out=[0, 0, 2], frequency_penalty=0.06)  # 2.0 - 0.12 < 1.9
    assert sample(logits, [once])[0].token_id == 0
    assert sample(logits, [twice])[0].token_id == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    assert sample(logits, [spec(temperature=0, out=[0], repetition_penalty=1.2)])[0].token_id == 1
    # -1.0 * 1.2 = -1.2 < -1.1: among the negative tokens, the penalised one drops below
    neg = torch.tensor([[-1.0, -1.1]])
    assert sample(neg, [spec(temperature=0, out=[0], repetition_penalty=1.2)])[0].token_id == 1


def test_penalties_apply_only_to_their_own_row() -> None:
    logits = torch.tensor([[2.0, 1.9], [2.0, 1.9]])
    specs = [spec(temperature=0, out=[0], presence_penalty=1.0), spec(temperature=0)]
    assert [t.token_id for t in sample(logits, specs)] == [1, 0]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**kwargs)


def test_sampling_params_normalisation() -> None:
    p = SamplingParams(stop="END", stop_token_ids=[5, 6], logprobs=20, top_p=1.0, min_p=1.0)
    assert p.stop == ("END",)
    assert p.stop_token_ids == (5, 6)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams().has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties


def test_greedy_token_is_listed_first_among_tied_top_logprobs() -> None:
    # bf16 logits tie often; topk alone lists the tied token with the larger id first here
    logits = torch.zeros(1, 1000)
    logits[0, [5, 40, 41]] = torch.tensor([3.0, 3.0, 2.0])
    (tok,) = sample(logits, [spec(temperature=0, logprobs=2)])
    assert tok.token_id == 5
    assert [t for t, _ in tok.top_logprobs] == [5, 40]
    assert tok.top_logprobs[0][1] == tok.top_logprobs[1][1] == tok.logprob
    # k=1 with the tie: the greedy token, not the other tied one
    (one,) = sample(logits, [spec(temperature=0, logprobs=1)])
    assert [t for t, _ in one.top_logprobs] == [5]


def test_greedy_takes_the_first_of_tied_maxima_in_wide_batches() -> None:
    """Greedy rows pick the lowest token id among tied maxima (bf16 logits tie often), as
    `argmax` does, over a real vocabulary width and many rows."""
    torch.manual_seed(0)
    rows, vocab = 300, 49152
    logits = torch.randn(rows, vocab).bfloat16().float()
    ties = torch.randint(0, vocab, (rows, 4))
    logits[torch.arange(rows)[:, None], ties] = 10.0
    logits[::2, :] = logits[::2, :].bfloat16().float()  # half the rows: plain bf16 values
    out = sample(logits, [spec(temperature=0)] * rows)
    assert [t.token_id for t in out] == ties.min(dim=1).values.tolist()
    plain = torch.randn(rows, vocab).bfloat16().float()
    out = sample(plain, [spec(temperature=0)] * rows)
    assert [t.token_id for t in out] == plain.argmax(dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_sample_as_their_float32_copy(dtype) -> None:
    """The model's bf16 logits go to the sampler as they are: greedy rows take their maximum
    without a float32 copy, other rows (seeded draws, penalties, logprobs) are converted; every
    token and logprob equals what the float32 copy gives."""
    torch.manual_seed(1)
    logits = (torch.randn(64, 3000) * 3).to(dtype)
    logits[:, 7] = logits.max()  # ties with the maximum in every row
    greedy = [spec(temperature=0)] * 64
    assert sample(logits, greedy) == sample(logits.float(), greedy)
    mixed = [
        spec(temperature=0),
        spec(temperature=0.8, seed_key=(3, 1)),
        spec(temperature=0, logprobs=3),
        spec(temperature=0, repetition_penalty=1.3, out=[7, 8]),
    ] * 16
    assert sample(logits, mixed) == sample(logits.float(), mixed)
