"""The engine's public observation points: `Engine.stats()` and step observers. The server's
metrics, the step log and the benchmarks read the engine only through them."""

from __future__ import annotations

import json

from conserve import LLM, SamplingParams
from conserve.engine.request import RequestClass
from conserve.engine.stats import StepObserver, StepRecord

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


class Recorder(StepObserver):
    def __init__(self) -> None:
        self.added: list[tuple[str, str, int]] = []
        self.started: list[int] = []  # tokens of each step as it starts
        self.ended: list[StepRecord] = []

    def on_request_added(
        self, request_id: str, request_class: str, prompt_len: int, arrived: float
    ) -> None:
        self.added.append((request_id, request_class, prompt_len))

    def on_step_start(self, batch) -> None:
        self.started.append(batch.num_tokens)

    def on_step_end(self, record: StepRecord) -> None:
        self.ended.append(record)


def test_observers_see_every_step_and_stats_add_up(tiny_llama_dir, tmp_path):
    log = tmp_path / "steps.jsonl"
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_num_batched_tokens=64, step_log=str(log))
    eng = llm.engine
    rec = Recorder()
    eng.add_observer(rec)
    before = eng.stats()
    assert before.num_steps == 0 and before.running == before.waiting == 0
    eng.add_request("a", list(range(300, 400)), GREEDY)  # 100 prompt tokens: 2 chunks
    eng.add_request("b", list(range(500, 520)), GREEDY, RequestClass.OFFLINE)
    assert rec.added == [("a", "online", 100), ("b", "offline", 20)]
    mid = eng.stats()
    assert mid.waiting == 2 and mid.by_class == {"online": (0, 1), "offline": (0, 1)}
    eng.step()
    running = eng.stats()
    assert running.running >= 1 and running.kv.request_tables == running.running
    assert running.kv.usage > 0 and running.kv.free_blocks < running.kv.num_blocks
    while eng.has_unfinished():
        eng.step()
    after = eng.stats()
    # every step was seen starting and ending, in order, with the tokens it carried
    assert len(rec.started) == len(rec.ended) == after.num_steps > 2
    assert rec.started == [r.batch.num_tokens for r in rec.ended]
    assert sum(rec.started) == 100 + 20 + 2 * (GREEDY.max_tokens - 1)
    assert abs(after.busy_s - sum(r.run_s for r in rec.ended)) < 1e-9
    assert all(not r.stopped and r.plan_s >= 0 and r.apply_s >= 0 for r in rec.ended)
    assert after.running == after.waiting == 0 and after.kv.request_tables == 0
    assert after.kv.usage == 0 and after.kv.free_blocks == after.kv.num_blocks
    assert after.kv.prefix_queries == 120
    assert after.num_preemptions == 0 and after.preemptions_by_kind()["layer"] == 0
    assert after.host is None  # fcfs keeps no host tier
    # the step log is an observer too: one line per request and per step
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["added"] for x in lines if "added" in x] == ["a", "b"]
    assert len([x for x in lines if "run_s" in x]) == after.num_steps
    eng.remove_observer(rec)
    eng.add_request("c", list(range(300, 310)), GREEDY)
    while eng.has_unfinished():
        eng.step()
    assert len(rec.ended) == after.num_steps  # removed: sees nothing more
    eng.check_integrity()


def test_aborts_are_counted_by_class_only_for_unfinished_requests(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32")
    eng = llm.engine
    assert eng.stats().aborted_by_class == {"online": 0, "offline": 0}
    eng.add_request("done", list(range(300, 310)), GREEDY)
    while eng.has_unfinished():
        eng.step()
    eng.add_request("on", list(range(300, 340)), GREEDY)
    eng.add_request("off", list(range(500, 540)), GREEDY, RequestClass.OFFLINE)
    eng.add_request("waiting", list(range(600, 640)), GREEDY, RequestClass.OFFLINE)
    eng.step()
    for rid in ("on", "off", "waiting", "done", "unknown"):
        eng.abort(rid)
    eng.abort("on")  # twice: counted once
    # a finished or unknown request is not counted; a running or waiting one is
    assert eng.stats().aborted_by_class == {"online": 1, "offline": 2}
    assert not eng.has_unfinished()
    eng.check_integrity()
