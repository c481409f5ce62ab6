"""A request body -> what the engine runs: the body validated, the model checked, the prompts
tokenized, one `SamplingParams` per prompt and the request class (online or offline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from conserve.engine.request import RequestClass
from conserve.openai.errors import OpenAIError, validation_error
from conserve.openai.params import requested_logprobs, requested_max_tokens, sampling_params
from conserve.openai.prompts import prompt_token_ids
from conserve.openai.protocol import ChatCompletionRequest, CompletionRequest
from conserve.openai.served import ServedModel
from conserve.sampling.params import SamplingParams

Body = ChatCompletionRequest | CompletionRequest

# the endpoints this layer answers, with their request bodies
REQUEST_BODIES: dict[str, type[Body]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


@dataclass
class Prepared:
    """A validated request, tokenized and checked, ready to send to the engine."""

    body: Body
    prompts: list[list[int]]
    params: list[SamplingParams]
    klass: RequestClass
    # time.monotonic() when the HTTP server received the request (None: not over HTTP)
    received: float | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)

    @property
    def tier(self) -> str:
        """The service tier the response reports."""
        return service_tier(self.body, self.klass)


def parse_body(endpoint: str, raw: Any) -> Body:
    """A JSON-decoded request body of `POST endpoint`, validated (OpenAIError 400 if not)."""
    try:
        return REQUEST_BODIES[endpoint].model_validate(raw)
    except ValidationError as e:
        raise validation_error(e.errors()) from e


def check_model(model: ServedModel, name: str) -> None:
    if name != model.model_name:
        raise OpenAIError(
            404,
            f"the model {name!r} does not exist; this server serves {model.model_name!r}",
            code="model_not_found",
            param="model",
        )


def request_class(body: Body) -> RequestClass:
    """`service_tier: "flex"` or a positive `priority` make a request offline."""
    if body.service_tier == "flex" or (body.priority or 0) > 0:
        return RequestClass.OFFLINE
    return RequestClass.ONLINE


def service_tier(body: Body, klass: RequestClass) -> str:
    return body.service_tier or ("flex" if klass == RequestClass.OFFLINE else "default")


def prepare(
    model: ServedModel,
    body: Body,
    klass: RequestClass,
    prompts: list[list[int]] | None = None,
) -> Prepared:
    """`body` checked and turned into engine requests, raising the error the endpoint answers
    (the model first, then the prompts, then the sampling fields of each prompt). `prompts`:
    the body's prompts already tokenized by `prompt_token_ids` (a batch line planned first)."""
    check_model(model, body.model)
    if prompts is None:
        prompts = prompt_token_ids(model.tokenizer, body)
    bound, logprobs = requested_max_tokens(body), requested_logprobs(body)
    params = [sampling_params(body, len(p), model.max_model_len, bound, logprobs) for p in prompts]
    return Prepared(body, prompts, params, klass)
