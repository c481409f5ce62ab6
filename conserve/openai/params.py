"""A request body's sampling fields -> the engine's `SamplingParams`, with the output bound
checked against the context window."""

from __future__ import annotations

from conserve.openai.errors import OpenAIError
from conserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from conserve.sampling.params import SamplingParams


def requested_max_tokens(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """The request's output bound; None (chat without one) means up to the context window."""
    if isinstance(body, ChatCompletionRequest):
        return body.max_completion_tokens or body.max_tokens
    return body.max_tokens or 16  # OpenAI's default for /v1/completions


def requested_logprobs(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """Top alternatives to return per sampled token; None: no logprobs at all."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    max_model_len: int,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """The parameters one prompt of `body` runs with; `max_tokens` None fills the window."""
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise OpenAIError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt "
            f"has {prompt_len} tokens and {max_tokens} more were requested",
            param="max_tokens",
            code="context_length_exceeded",
        )
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop or (),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logprobs=logprobs,
        )
    except ValueError as e:
        raise OpenAIError(400, str(e), param=str(e).split(" ", 1)[0]) from e
