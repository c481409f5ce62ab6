"""A batch line's body prepared once, for the planner and for its run.

Planning an order (dfs, blend) needs every line's prompt token ids and output bound; running
a line needs the same tokens plus its sampling parameters. `prepare_line` does the work of the
HTTP endpoint once: the planner reads `LinePreparation.shape`, and the line carries the
preparation (`PreparedLine`) through the plan to `execute`, which sends it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from conserve.batch.validate import BatchLine
from conserve.engine.request import RequestClass
from conserve.openai.errors import OpenAIError
from conserve.openai.params import requested_max_tokens
from conserve.openai.prepare import Body, Prepared, check_model, parse_body, prepare
from conserve.openai.prompts import prompt_token_ids
from conserve.openai.served import ServedModel


@dataclass(frozen=True)
class LineShape:
    """What the batch planner needs of a request body: its first prompt as the endpoint
    tokenizes it, its output bound, how many sequences it runs, and whether the output length
    is known exactly (ignore_eos, or min_tokens up to the bound)."""

    prompt_ids: list[int]
    max_tokens: int
    copies: int  # prompts x n
    exact: bool


def line_shape(body: Body, prompts: list[list[int]], max_model_len: int) -> LineShape:
    first = prompts[0]
    bound = requested_max_tokens(body)
    max_tokens = max(1, max_model_len - len(first) if bound is None else bound)
    exact = body.ignore_eos or body.min_tokens >= max_tokens
    return LineShape(first, max_tokens, len(prompts) * body.n, exact)


@dataclass
class LinePreparation:
    """One line's body prepared as the endpoint would prepare it. `body` None: the body is
    invalid and `error` is the validation error. Otherwise `request` is what runs, or `error`
    what preparing it raised (answered after the checks that come first at the endpoint).
    `shape` is None when the body or its prompts are invalid: the planner runs such lines
    first, as they cost nothing."""

    body: Body | None
    shape: LineShape | None
    request: Prepared | None
    error: Exception | None


@dataclass(frozen=True)
class PreparedLine(BatchLine):
    """A batch line with its preparation, as an order hook yields it to `execute`."""

    prep: LinePreparation

    @staticmethod
    def of(line: BatchLine, prep: LinePreparation) -> PreparedLine:
        return PreparedLine(line.line, line.custom_id, line.url, line.body, prep)


def prepare_line(model: ServedModel, line: BatchLine) -> LinePreparation:
    """`line`'s body validated, tokenized and turned into offline engine requests (batch lines
    are always offline). Never raises for a bad body: the error is kept to be answered."""
    try:
        body = parse_body(line.url, line.body)
    except OpenAIError as e:
        return LinePreparation(None, None, None, e)
    prompts: list[list[int]] | None = None
    try:
        prompts = prompt_token_ids(model.tokenizer, body)
        tokenize_error: Exception | None = None
    except (OpenAIError, ValueError, TypeError) as e:
        tokenize_error = e
    shape = line_shape(body, prompts, model.max_model_len) if prompts is not None else None
    try:
        if tokenize_error is not None:
            check_model(model, body.model)  # the endpoint checks the model before the prompt
            raise tokenize_error
        request = prepare(model, body, RequestClass.OFFLINE, prompts)
        return LinePreparation(body, shape, request, None)
    except Exception as e:  # noqa: BLE001 - raised again when the line runs, as the endpoint would
        return LinePreparation(body, shape, None, e)
