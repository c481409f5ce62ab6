"""What the runner asks the sampler for, and what it gets back: plain data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conserve.sampling.params import SamplingParams


@dataclass(frozen=True)
class SampleSpec:
    """What the runner needs to pick the next token of one request."""

    params: SamplingParams
    # (seed, index of the token being sampled): seeded sampling then depends on nothing else
    seed_key: tuple[int, int] | None = None
    # generated tokens so far, only when penalties need them
    output_token_ids: Sequence[int] | None = None


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: Sequence[tuple[int, float]] | None = None
