"""The host tier backed by a directory (`--host-kv-path`): its blocks and journal outlive the
store that wrote them, a new store finds them as orphans, a request with the same leading
tokens adopts and restores them (checked against the fake runner's KV), and the directory is
guarded (layout, lock, a journal cut short)."""

from __future__ import annotations

import pytest
import torch
from test_policies import FakeMover, make
from test_scheduler import BS, expected_output, step

from conserve.engine.request import Request, RequestClass
from conserve.kv.host_file import JOURNAL, HostFile, HostKVPathError
from conserve.kv.host_tier import HostKVStore, TensorMover
from conserve.sampling.params import SamplingParams

LAYOUT = {"model": "m", "dtype": "torch.float32", "block": [2, 1, 4, 2], "host_blocks": 6}


def device_kv(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 5, 4, 2, generator=g), torch.randn(2, 1, 5, 4, 2, generator=g)


def store(path, num_blocks: int = 6, layout=LAYOUT, kv=None) -> HostKVStore:
    file = HostFile(path, layout)
    k, v = kv if kv is not None else device_kv(0)
    return HostKVStore(num_blocks, 4, TensorMover(k, v, num_blocks, file), file)


def test_saved_blocks_outlive_the_store_and_come_back_for_the_same_tokens(tmp_path):
    k, v = device_kv(1)
    first = store(tmp_path, kv=(k, v))
    tokens = list(range(100, 114))  # 3 full blocks of 4, and 2 tokens
    first.checkpoint({"a": ([4, 0, 2, 1], 14, tokens)})
    assert first.saved_tokens("a") == 12
    first.file.close()  # the engine dies: nothing dropped

    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    second = store(tmp_path, kv=(dk, dv))
    assert second.file.reused and second.num_orphans == 3 and second.num_free_blocks == 3
    assert second.orphan_blocks(tokens, 3) == 3
    assert second.orphan_blocks(tokens, 2) == 2
    assert second.orphan_blocks(tokens[:4] + [7] * 8, 3) == 1  # the same first block only
    assert second.orphan_blocks([7] * 12, 3) == 0
    second.adopt("b", tokens, 3)
    second.restore("b", [3, 1, 0], 0, 3)  # into other device blocks
    for d, s in ((dk, k), (dv, v)):
        assert torch.equal(d[:, :, [3, 1, 0]], s[:, :, [4, 0, 2]])
    assert second.num_orphans == 0 and second.saved_tokens("b") == 12
    second.check_integrity()
    second.drop("b")  # finished: released in the journal too
    second.file.close()
    third = store(tmp_path)
    assert third.num_orphans == 0 and third.num_free_blocks == 6
    third.check_integrity()


def test_orphans_are_given_up_first_when_the_tier_is_full(tmp_path):
    first = store(tmp_path, num_blocks=4, layout=LAYOUT | {"host_blocks": 4})
    first.checkpoint({"a": ([0, 1, 2], 12, list(range(12)))})
    first.file.close()
    second = store(tmp_path, num_blocks=4, layout=LAYOUT | {"host_blocks": 4})
    assert second.num_orphans == 3
    copied = second.checkpoint({"b": ([3, 4], 8, list(range(50, 58)))})
    assert copied == 2 and second.num_orphans == 2  # one free block, then one orphan's
    second.check_integrity()
    second.file.close()
    third = store(tmp_path, num_blocks=4, layout=LAYOUT | {"host_blocks": 4})
    assert third.num_orphans == 4  # b's two blocks and a's last two (the journal says so)
    assert third.orphan_blocks(list(range(50, 58)), 2) == 2
    third.check_integrity()


def test_another_layout_empties_the_directory_and_a_second_engine_is_refused(tmp_path):
    first = store(tmp_path)
    first.checkpoint({"a": ([0], 4, [1, 2, 3, 4])})
    with pytest.raises(HostKVPathError, match="in use by another engine"):
        HostFile(tmp_path, LAYOUT)
    first.file.close()
    other = store(tmp_path, layout=LAYOUT | {"model": "another"})
    assert not other.file.reused and other.num_orphans == 0


def test_a_journal_line_cut_short_is_ignored(tmp_path):
    first = store(tmp_path)
    first.checkpoint({"a": ([0, 1], 8, list(range(8)))})
    first.file.close()
    with open(tmp_path / JOURNAL, "a") as f:
        f.write("s 4 " + "ab" * 16 + "\ns 5 ab")  # a crash in the middle of a line
    second = store(tmp_path)
    assert second.num_orphans == 3  # a's two blocks and block 4; not the line cut short
    second.check_integrity()


def test_a_new_engine_restores_a_retried_prompt_instead_of_computing_it(tmp_path):
    """An offline request computes its 117-token prompt and is checkpointed; its engine dies.
    A new scheduler (new device KV: the fake runner's slots are empty) gets the same prompt
    again: it adopts the 29 saved blocks, computes only the last prompt token (the fake runner
    asserts every earlier position holds the right token) and gives the same output."""
    layout = LAYOUT | {"host_blocks": 64}
    tokens = list(range(5000, 5117))

    def line(rid: str, prompt: list[int]) -> Request:
        sampling = SamplingParams(max_tokens=6, temperature=0)
        return Request(rid, list(prompt), sampling, RequestClass.OFFLINE)

    s1, r1 = make("conserve", budget=512, offline_step_s=1.0)
    mover1 = FakeMover(r1)
    s1.host = HostKVStore(64, BS, mover1, HostFile(tmp_path, layout))
    s1.add(line("line", tokens))
    step(s1, r1)
    s1.checkpoint_offline()
    assert s1.host.saved_tokens("line") == 116  # 29 full blocks of 4
    s1.host.file.close()  # the engine is killed here

    s2, r2 = make("conserve", budget=512, offline_step_s=1.0)
    mover2 = FakeMover(r2)
    mover2.host = mover1.host  # what the file kept
    s2.host = HostKVStore(64, BS, mover2, HostFile(tmp_path, layout))
    assert s2.host.num_orphans == 29
    s2.add(line("again", tokens))
    s2.add(line("other", list(range(9000, 9117))))
    batch = step(s2, r2)
    starts = {c.request_id: c.start for c in batch.chunks}
    assert starts == {"again": 116, "other": 0}
    assert s2.tokens_restored == 116 and s2.host.blocks_adopted == 29
    outputs = {}
    while s2.num_unfinished:
        before = dict(s2.requests)
        step(s2, r2)
        for rid, q in before.items():
            if q.is_finished:
                outputs[rid] = q.output_token_ids
    assert outputs["again"] == expected_output(117, 6)
    assert s2.host.num_free_blocks == 64  # adopted blocks are released with their request
    s2.check_integrity()
