"""Incremental detokenization and stop strings.

Text is produced by decoding a short window of tokens twice (up to the last emitted token, and
up to the newest one) and emitting the difference. A window whose text ends in U+FFFD is an
incomplete multi-byte character split across tokens: nothing is emitted until it completes.
The window starts with a few prompt tokens so that the first generated token gets the spacing
it would have inside the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from conserve.model.tokenizer import Tokenizer

_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.num_context = len(self.ids)
        self.text = ""

    @property
    def num_consumed(self) -> int:
        """Generated tokens taken in so far."""
        return len(self.ids) - self.num_context

    def update(self, output_ids: Sequence[int]) -> str:
        """Take in all generated tokens not seen yet; return the newly completed text."""
        self.ids.extend(output_ids[self.num_consumed :])
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip)
        full = decode(self.ids[self.prefix_offset :], skip)
        if len(full) <= len(before) or full.endswith("\ufffd"):
            return ""
        delta = full[len(before) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, num_new_chars: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `num_new_chars` characters of `text`.
    Returns (index where it starts, the string)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
