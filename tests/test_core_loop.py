"""The engine core's loop (`conserve.core.process._CoreLoop`) on a real tiny engine, with the
pipe replaced by a list: what it sends to the API process, and when."""

from __future__ import annotations

import time

from conserve import LLM, SamplingParams
from conserve.core import process
from conserve.core.messages import Abort, AddRequest, Door, RequestDelta
from conserve.engine.request import RequestClass

ONLINE, OFFLINE = RequestClass.ONLINE, RequestClass.OFFLINE


class Conn:
    """The core's end of the pipe: records every message sent."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def deltas(self) -> list[RequestDelta]:
        return [d for m in self.sent if isinstance(m, list) for d in m]


def _loop(tiny_llama_dir):
    # fcfs: the running offline decode runs beside an online prompt chunk
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_num_batched_tokens=64, policy="fcfs")
    conn = Conn()
    return process._CoreLoop(llm.engine, conn), conn


def _add(loop, rid, prompt, cls, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    loop._add(AddRequest(rid, prompt, params, cls, True), time.monotonic())


def _tokens(deltas, rid) -> list[int]:
    return [t for d in deltas if d.request_id == rid for t in d.seqs[0].token_ids]


def test_offline_deltas_wait_while_online_work_lasts(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(process, "OFFLINE_INTERVAL_S", 0.0)  # else sent every half second
    monkeypatch.setattr(process, "ONLINE_QUIET_S", 3600.0)  # moved past below, not waited for
    loop, conn = _loop(tiny_llama_dir)
    eng = loop.engine
    _add(loop, "off", list(range(300, 310)), OFFLINE, 12)
    for _ in range(3):  # the offline request decodes; each step's token is sent at once
        loop._step()
    assert len(_tokens(conn.deltas(), "off")) == 3 and not loop.held
    _add(loop, "on", list(range(500, 600)), ONLINE, 4)  # 100 prompt tokens: two chunks of 64
    held_steps = 0
    while True:
        before = len(conn.sent)
        loop._step()
        held_steps += 1
        new = [d.request_id for m in conn.sent[before:] for d in m]
        if not eng.online_pending():
            break
        # the online request runs: only its tokens are sent, the offline ones are held
        assert set(new) <= {"on"} and loop.held
    # two prompt chunks, three more tokens; the step that finished the online request sends
    # its last token, and the offline output stays held while that token is on its way
    assert held_steps == 5 and new == ["on"] and loop.held
    before = len(conn.sent)
    loop._step()  # an offline step right after: still within ONLINE_QUIET_S
    assert len(conn.sent) == before and loop.held
    loop.online_sent_at -= process.ONLINE_QUIET_S
    loop._step()  # then what was held goes, merged: one delta
    assert [d.request_id for d in conn.sent[-1]] == ["off"]
    assert len(_tokens(conn.deltas(), "off")) == 3 + 7 and not loop.held
    while eng.has_unfinished():
        loop._step()
    assert not loop.held
    out = conn.deltas()
    off = [d for d in out if d.request_id == "off"]
    assert len(_tokens(out, "off")) == 12 and off[-1].finished and sum(d.finished for d in off) == 1
    assert len(_tokens(out, "on")) == 4
    eng.check_integrity()


def test_held_deltas_are_sent_after_a_time_limit_and_dropped_on_abort(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(process, "OFFLINE_INTERVAL_S", 0.0)
    loop, conn = _loop(tiny_llama_dir)
    eng = loop.engine
    _add(loop, "off1", list(range(300, 310)), OFFLINE, 30)
    _add(loop, "off2", list(range(320, 330)), OFFLINE, 30)
    loop._step()
    monkeypatch.setattr(eng, "online_pending", lambda: True)  # online work forever
    for _ in range(3):
        loop._step()
    assert {d.request_id for d in loop.held} == {"off1", "off2"}
    sent = len(conn.deltas())
    # an abort drops what was held for that request (the API process has forgotten it)
    loop.inbox.put((Abort(["off2"]), time.monotonic()))
    loop._take_messages(block=False)
    assert {d.request_id for d in loop.held} == {"off1"}
    # held longer than OFFLINE_HOLD_S: sent with the next step's deltas
    loop.held_since -= process.OFFLINE_HOLD_S + 0.1
    loop._step()
    assert not loop.held and len(conn.deltas()) > sent
    assert "off2" not in {d.request_id for d in conn.deltas()[sent:]}
    eng.abort("off1")
    eng.check_integrity()


def test_offline_streams_are_sent_in_merged_deltas_every_interval(tiny_llama_dir, monkeypatch):
    loop, conn = _loop(tiny_llama_dir)
    eng = loop.engine
    clock = [1000.0]
    monkeypatch.setattr(process.time, "monotonic", lambda: clock[0])
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=1)
    loop._add(AddRequest("off", list(range(300, 310)), params, OFFLINE, True), clock[0])
    for _ in range(4):  # the tiny model's steps take far less than the interval
        loop._step()
    assert conn.deltas() == []
    clock[0] += process.OFFLINE_INTERVAL_S
    loop._step()  # the fifth: the five offline deltas go as one
    off = [d for d in conn.deltas() if d.request_id == "off"]
    assert len(off) == 1 and len(off[0].seqs[0].token_ids) == 5 == len(off[0].seqs[0].logprobs)
    while eng.has_unfinished():
        loop._step()
    loop._flush()  # as the loop does before it waits for messages
    out = eng.scheduler  # every request finished: the merged deltas add up to the outputs
    assert not out.requests
    off = [d for d in conn.deltas() if d.request_id == "off"]
    assert len(off) == 2 and off[-1].finished and not off[0].finished
    assert len(_tokens(off, "off")) == 9 and sum(len(d.seqs[0].logprobs) for d in off) == 9
    # the same request alone, computed again: same tokens and text
    loop2, conn2 = _loop(tiny_llama_dir)
    monkeypatch.setattr(process, "OFFLINE_INTERVAL_S", 0.0)
    loop2._add(AddRequest("off", list(range(300, 310)), params, OFFLINE, True), clock[0])
    while loop2.engine.has_unfinished():
        loop2._step()
    alone = conn2.deltas()
    assert _tokens(alone, "off") == _tokens(off, "off")
    assert "".join(d.seqs[0].text for d in alone) == "".join(d.seqs[0].text for d in off)
    eng.check_integrity()


def test_the_door_reaches_the_engine_and_the_loop_waits_at_it(tiny_llama_dir, monkeypatch):
    """A Door message is passed to the engine by the pipe thread (as it arrives, while a step
    may run) and wakes the loop; with offline work and the door open, the loop waits for a
    message for what is left of DOOR_WAIT_S instead of stepping, and no longer than that."""
    from conserve.engine import engine as engine_mod

    monkeypatch.setattr(engine_mod, "DOOR_WAIT_S", 3600.0)  # a slow machine cannot outlast it
    loop, _ = _loop(tiny_llama_dir)
    eng = loop.engine

    class Pipe:
        def __init__(self) -> None:
            self.msgs = [Door(True)]

        def recv(self):
            if not self.msgs:
                raise EOFError
            return self.msgs.pop(0)

    _add(loop, "off", list(range(300, 310)), OFFLINE, 4)
    process._read_pipe(Pipe(), loop.inbox, eng)  # returns at EOF (a Shutdown in the inbox)
    assert eng.online_pending() and eng.door_wait() > 0
    msg, _ = loop.inbox.get_nowait()
    assert msg == Door(True)
    assert loop._take_messages(block=True, timeout=eng.door_wait()) is False  # the Shutdown
    eng.door(False)
    assert eng.door_wait() == 0.0
    assert loop._take_messages(block=True, timeout=0.01) is True  # empty: back after 10 ms
    eng.abort("off")
    eng.check_integrity()
