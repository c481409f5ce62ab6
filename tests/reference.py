"""Reference generation with the `transformers` implementation: plain greedy loop, batch 1."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int):
    """Greedy tokens (EOS not special) and the first-step logits for every prompt."""
    tokens, first_logits = [], []
    for ids in prompts:
        out = model(torch.tensor([ids]), use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
        first_logits.append(logits)
        gen = []
        for _ in range(max_new_tokens):
            nxt = int(logits.argmax())
            gen.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
        tokens.append(gen)
    return tokens, torch.stack(first_logits)
