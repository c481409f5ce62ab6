"""What the engine returns, and the per-request state that produces it (text, logprobs, stop
conditions). Requests with `n > 1` run as n independent sequences grouped under one output."""

from __future__ import annotations

from dataclasses import dataclass, field

from conserve.engine.request import Request, RequestStatus
from conserve.model.tokenizer import Tokenizer
from conserve.sampling.detokenizer import IncrementalDetokenizer, find_stop
from conserve.sampling.types import SampledToken


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that matched
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


def stop_status(
    request: Request, eos_ids: frozenset[int], max_model_len: int
) -> RequestStatus | None:
    """After a token was appended: finish on a stop token, EOS, max_tokens or the context end
    (recording the matched stop token in `request.stop_reason`); None to continue."""
    p = request.sampling
    token = request.token_ids[-1]
    n_out = request.num_output_tokens
    if n_out >= p.min_tokens:
        if token in p.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if not p.ignore_eos and token in eos_ids:
            return RequestStatus.FINISHED_STOPPED
    if p.max_tokens is not None and n_out >= p.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


class SequenceState:
    """Output-side state of one sequence: its text, logprobs and stop strings."""

    def __init__(self, request: Request, index: int, tokenizer: Tokenizer, stream: bool) -> None:
        p = request.sampling
        self.request = request
        self.output = CompletionOutput(index, logprobs=[] if p.logprobs is not None else None)
        self.detok = IncrementalDetokenizer(
            tokenizer, request.prompt_token_ids, p.skip_special_tokens
        )
        # Detokenize every step only when someone looks at the text before the end.
        self.incremental = stream or bool(p.stop)

    def on_token(self, sampled: SampledToken) -> None:
        if self.output.logprobs is not None and sampled.logprob is not None:
            self.output.logprobs.append(
                TokenLogprob(sampled.token_id, sampled.logprob, tuple(sampled.top_logprobs or ()))
            )

    def check_stop_strings(self) -> bool:
        """Detokenize the new tokens; True if a stop string ended the text (it is cut off)."""
        before = len(self.detok.text)
        delta = self.detok.update(self.request.output_token_ids)
        if not delta or not self.request.sampling.stop:
            return False
        hit = find_stop(self.detok.text, len(self.detok.text) - before, self.request.sampling.stop)
        if hit is None:
            return False
        self.detok.text = self.detok.text[: hit[0]]
        self.request.stop_reason = hit[1]
        return True

    def refresh(self, status: RequestStatus | None) -> None:
        """Copy the request's state into its CompletionOutput."""
        if status is not None and not self.incremental:
            self.detok.update(self.request.output_token_ids)
        out = self.output
        out.token_ids = self.request.output_token_ids
        out.text = self.detok.text
        if status is not None:
            out.finish_reason = status.value
            out.stop_reason = self.request.stop_reason
