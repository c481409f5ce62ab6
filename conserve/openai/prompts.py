"""Request bodies -> prompt token ids: chat messages through the model's chat template, and
the four forms of a completion's `prompt`."""

from __future__ import annotations

from typing import Any

from conserve.model.tokenizer import Tokenizer
from conserve.openai.errors import OpenAIError
from conserve.openai.protocol import ChatCompletionRequest, CompletionRequest


def chat_prompt_ids(tokenizer: Tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The prompt of a chat request: its messages through the model's chat template."""
    try:
        return tokenizer.apply_chat_template(body.template_messages())
    except Exception as e:  # noqa: BLE001 - template errors are the caller's input
        raise OpenAIError(400, f"cannot apply the chat template: {e}", param="messages") from e


def split_prompts(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """A completion's `prompt` (a string, a list of strings, token ids or lists of them) as
    one token id list per prompt; empty prompts and ids outside the vocabulary are errors."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    out = []
    for item in items:
        ids = tokenizer.encode(item) if isinstance(item, str) else [int(t) for t in item]
        if not ids:
            raise OpenAIError(400, "prompt must not be empty", param="prompt")
        if any(t < 0 or t >= tokenizer.vocab_size for t in ids):
            raise OpenAIError(400, "prompt token ids out of range", param="prompt")
        out.append(ids)
    return out


def prompt_token_ids(
    tokenizer: Tokenizer, body: ChatCompletionRequest | CompletionRequest
) -> list[list[int]]:
    """Every prompt of a request as token ids (a chat request has exactly one)."""
    if isinstance(body, ChatCompletionRequest):
        return [chat_prompt_ids(tokenizer, body)]
    return split_prompts(body.prompt, tokenizer)
