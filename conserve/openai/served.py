"""What the OpenAI layer needs of the engine behind it: the served model's name, context
window and tokenizer, and a way to run one request. `conserve.core.client.EngineClient` is one;
tests can pass a stub."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from conserve.core.messages import RequestDelta
from conserve.engine.request import RequestClass
from conserve.model.tokenizer import Tokenizer
from conserve.sampling.params import SamplingParams


class ServedModel(Protocol):
    """The model requests are prepared for and answered as."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer


class Backend(ServedModel, Protocol):
    """A served model that runs requests."""

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_class: RequestClass,
        stream: bool,
        received: float | None = None,
    ) -> AsyncIterator[RequestDelta]:
        """Deltas of one request until it finishes; closing the stream early aborts it.
        `received`: `time.monotonic()` when the HTTP server got the request, if known."""
        ...


# How the serving side follows a request's delta stream (admission counts, metrics): it gets
# the stream as the request is admitted and returns the stream to read in its place.
Track = Callable[[RequestClass, AsyncIterator[RequestDelta]], AsyncIterator[RequestDelta]]


def untracked(
    klass: RequestClass, stream: AsyncIterator[RequestDelta]
) -> AsyncIterator[RequestDelta]:
    """The Track that counts nothing: the stream as it is."""
    return stream
