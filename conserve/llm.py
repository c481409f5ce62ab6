"""Offline Python API: `LLM(model="default").generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from conserve.config import EngineConfig
from conserve.engine.engine import Engine
from conserve.engine.output import RequestOutput
from conserve.engine.request import RequestClass
from conserve.engine_args import EngineArgs
from conserve.sampling.params import SamplingParams

Prompt = str | Sequence[int]
Conversation = list[dict[str, Any]]


class LLM:
    """Runs the engine in this process. Keyword arguments are the fields of `EngineArgs` (the
    settings of the command line, named as in the config: `dtype`, `max_num_seqs`, `policy`,
    `num_threads`, `enable_prefix_caching`, `num_blocks`, ...); an unknown one raises
    TypeError naming it."""

    def __init__(self, model: str | None = "default", **kwargs: Any) -> None:
        config = EngineArgs(model=model, **kwargs).to_config()
        self._attach(Engine.from_config(config))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._attach(Engine.from_config(config))
        return llm

    def _attach(self, engine: Engine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        request_class: RequestClass = RequestClass.OFFLINE,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = _per_prompt(sampling_params, len(prompts))
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            rid = f"gen-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p, request_class)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        prompts = [
            self.tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(ids), desc="generate", unit="req", disable=not use_tqdm or len(ids) < 2
        )
        wanted = set(ids)
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in ids]


def _per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return list(params)
