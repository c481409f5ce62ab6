"""CPU tensors on madvised anonymous mappings (conserve/hugepages.py): zeroed where asked,
placed where asked, and plain torch memory when turned off or full; the default bf16 engine's
packed weights and KV cache live there and give the same tokens as without."""

from __future__ import annotations

import torch
from conftest import native_kernels

from conserve import LLM, hugepages
from conserve.sampling.params import SamplingParams


def test_zeros_is_zeroed_and_starts_on_a_huge_page_boundary(monkeypatch):
    monkeypatch.delenv("CONSERVE_HUGEPAGES", raising=False)
    t = hugepages.zeros((3, 1000, 7), torch.bfloat16)
    assert t.shape == (3, 1000, 7) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert not t.any()
    if hugepages.enabled():
        assert t.data_ptr() % hugepages.HUGE == 0
    t += 1  # writable
    assert (t == 1).all()


def test_turned_off_it_is_torch_memory(monkeypatch):
    monkeypatch.setenv("CONSERVE_HUGEPAGES", "0")
    assert not hugepages.enabled()
    t = hugepages.zeros((4, 4), torch.float32)
    assert not t.any()
    a = hugepages.Arena(1 << 20)
    assert a.buf is None and a.take((2, 3), torch.float32).shape == (2, 3)


def test_arena_hands_out_page_aligned_tensors_in_order_then_falls_back():
    room = hugepages.Arena.room((10, 10), torch.float32)
    assert room == 4096
    a = hugepages.Arena(2 * room)
    x, y = a.take((10, 10), torch.float32), a.take((10, 10), torch.float32)
    x.fill_(1)
    y.fill_(2)
    assert (x == 1).all() and (y == 2).all()  # no overlap
    if a.buf is not None:
        assert y.data_ptr() - x.data_ptr() == room and x.data_ptr() % 4096 == 0
    z = a.take((10, 10), torch.float32)  # no room left: torch's own memory
    z.fill_(3)
    assert (x == 1).all() and (y == 2).all() and a.used == 2 * room


def test_engine_tokens_are_the_same_with_and_without(monkeypatch):
    native_kernels()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    p = SamplingParams(temperature=0, max_tokens=12)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("CONSERVE_HUGEPAGES", flag)
        assert hugepages.enabled() == (flag == "1")  # Linux: anonymous mappings, madvise
        llm = LLM("default", dtype="bfloat16", num_blocks=64)
        runner = llm.engine.runner
        packed = runner.model.lm_head.fast.packed
        # on: the packed weights share one mapping (the LM head's is a view into it) and the
        # KV cache starts on a huge page; off: torch's own tensors
        assert (packed._base is not None) == (flag == "1")
        assert (runner.kv.k.data_ptr() % hugepages.HUGE == 0) or flag == "0"
        out[flag] = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
        llm.engine.check_integrity()
    assert out["1"] == out["0"]
