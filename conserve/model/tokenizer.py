"""Tokenizer, special tokens and chat template of a model.

Hugging Face folders are read with `transformers.AutoTokenizer`. For a GGUF file the tokenizer is
rebuilt from the file's metadata (vocabulary, merges, special tokens, chat template); that
conversion takes seconds, so its result is kept in the cache directory and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conserve.model.loader import ModelSource
from conserve.paths import cache_dir

log = logging.getLogger(__name__)


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[
        :20
    ]


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int]) -> None:
        self.hf = hf_tokenizer
        self.fast = hf_tokenizer._tokenizer  # tokenizers.Tokenizer: fast decode without Python glue
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size = len(hf_tokenizer)

    @staticmethod
    def load(source: ModelSource) -> Tokenizer:
        from transformers import AutoTokenizer

        if source.gguf_file:
            cached = cache_dir() / "tokenizers" / _file_key(source.path)
            if (cached / "tokenizer.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(cached))
            else:
                tok = AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file)
                try:
                    tok.save_pretrained(str(cached))
                except OSError as e:  # a read-only cache only costs start-up time
                    log.warning("cannot cache the tokenizer in %s: %s", cached, e)
        else:
            tok = AutoTokenizer.from_pretrained(str(source.folder))
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        eos |= _generation_config_eos(source.folder) if not source.gguf_file else set()
        return Tokenizer(tok, sorted(eos))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.fast.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.fast.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text one token stands for on its own (used for logprobs entries)."""
        return self.fast.decode([token_id], skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt token ids for a conversation. The template text already holds every special
        token the model expects, so it is encoded without adding any (no doubled start token)."""
        if not self.has_chat_template and chat_template is None:
            raise ValueError("this model has no chat template; use a plain completion prompt")
        text = self.hf.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            chat_template=chat_template,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False)


def _generation_config_eos(folder: Path) -> set[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}
