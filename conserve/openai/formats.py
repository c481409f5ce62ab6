"""Response bodies: the full JSON of a finished request and the chunks of a streamed one, for
chat (`chat.completion`) and text completions (`text_completion`): choices, finish reasons,
usage and logprobs."""

from __future__ import annotations

import time
import uuid
from typing import Any

from conserve.core.messages import RequestDelta
from conserve.model.tokenizer import Tokenizer
from conserve.openai.prepare import Prepared
from conserve.openai.protocol import ChatCompletionRequest
from conserve.openai.served import ServedModel


def finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI names it (a stop string or token is "stop")."""
    return None if reason is None else ("length" if reason == "length" else "stop")


class ResponseFormat:
    """The shapes of one response: its id, creation time, model and tier, in every chunk."""

    object_full = ""
    object_chunk = ""

    def __init__(self, rid: str, model_name: str, tokenizer: Tokenizer, body, tier: str) -> None:
        self.rid, self.model_name, self.tokenizer = rid, model_name, tokenizer
        self.body, self.tier = body, tier
        self.created = int(time.time())
        self.n = body.n

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "service_tier": self.tier,
        }

    def usage(self, finals: list) -> dict[str, int]:
        prompt = sum(f.num_prompt_tokens for f in finals if f is not None)
        gen = sum(f.num_generated_tokens for f in finals if f is not None)
        cached = sum(f.num_cached_tokens for f in finals if f is not None)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": gen,
            "total_tokens": prompt + gen,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def usage_chunk(self, finals: list) -> dict[str, Any]:
        return self._head(self.object_chunk) | {"choices": [], "usage": self.usage(finals)}

    def full(self, per_prompt: list[list[RequestDelta]], num_prompts: int) -> dict[str, Any]:
        """The non-streaming body from every delta of every prompt (choices prompt-major)."""
        choices = []
        for p, deltas in enumerate(per_prompt):
            for seq in range(self.n):
                parts = [s for d in deltas for s in d.seqs if s.index == seq]
                text = "".join(s.text for s in parts)
                ids = [t for s in parts for t in s.token_ids]
                lps = [e for s in parts for e in (s.logprobs or [])]
                finish = parts[-1].finish_reason if parts else None
                choices.append(self.choice(p * self.n + seq, text, ids, lps, finish))
        finals = [d[-1] for d in per_prompt]
        return self._head(self.object_full) | {"choices": choices, "usage": self.usage(finals)}

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def choice(self, index: int, text: str, ids: list[int], lps: list, finish) -> dict:
        raise NotImplementedError

    def first_chunks(self, num_prompts: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def delta_chunks(self, prompt_idx: int, d: RequestDelta) -> list[dict[str, Any]]:
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def logprobs(self, entries: list) -> dict[str, Any] | None:
        if not self.body.logprobs:
            return None

        def item(tid: int, lp: float) -> dict[str, Any]:
            tok = self.token_str(tid)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}

        return {
            "content": [
                item(e.token_id, e.logprob) | {"top_logprobs": [item(t, v) for t, v in e.top]}
                for e in entries
            ]
        }

    def choice(self, index: int, text: str, ids: list[int], lps: list, finish) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": self.logprobs(lps),
            "finish_reason": finish_reason(finish),
        }

    def first_chunks(self, num_prompts: int) -> list[dict[str, Any]]:
        """One chunk per choice carrying the role, before any text."""
        return [
            self._head(self.object_chunk)
            | {
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            }
            for i in range(num_prompts * self.n)
        ]

    def delta_chunks(self, prompt_idx: int, d: RequestDelta) -> list[dict[str, Any]]:
        out = []
        for s in d.seqs:
            if not s.text and not s.finish_reason and not s.logprobs:
                continue
            out.append(
                self._head(self.object_chunk)
                | {
                    "choices": [
                        {
                            "index": prompt_idx * self.n + s.index,
                            "delta": {"content": s.text},
                            "logprobs": self.logprobs(s.logprobs or []),
                            "finish_reason": finish_reason(s.finish_reason),
                        }
                    ]
                }
            )
        return out


class CompletionFormat(ResponseFormat):
    object_full = "text_completion"
    object_chunk = "text_completion"

    def logprobs(self, entries: list, offset0: int = 0) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        tokens = [self.token_str(e.token_id) for e in entries]
        offsets, pos = [], offset0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token_str(t): v for t, v in e.top} for e in entries],
            "text_offset": offsets,
        }

    def choice(self, index: int, text: str, ids: list[int], lps: list, finish) -> dict:
        return {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(lps),
            "finish_reason": finish_reason(finish),
        }

    def first_chunks(self, num_prompts: int) -> list[dict[str, Any]]:
        return []

    def delta_chunks(self, prompt_idx: int, d: RequestDelta) -> list[dict[str, Any]]:
        out = []
        for s in d.seqs:
            if not s.text and not s.finish_reason:
                continue
            out.append(
                self._head(self.object_chunk)
                | {
                    "choices": [
                        self.choice(
                            prompt_idx * self.n + s.index,
                            s.text,
                            s.token_ids,
                            s.logprobs or [],
                            s.finish_reason,
                        )
                    ]
                }
            )
        return out


def response_format(p: Prepared, model: ServedModel) -> ResponseFormat:
    """A new response to `p`: a fresh id (chatcmpl-... or cmpl-...) and creation time."""
    if isinstance(p.body, ChatCompletionRequest):
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return ChatFormat(rid, model.model_name, model.tokenizer, p.body, p.tier)
    rid = f"cmpl-{uuid.uuid4().hex}"
    return CompletionFormat(rid, model.model_name, model.tokenizer, p.body, p.tier)
