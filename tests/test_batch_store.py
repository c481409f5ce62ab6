"""Batch pieces without a model: the input validator, the durable result files, the SQLite store,
and the runner's window/order/cancel mechanics (with a stand-in `execute` that answers at once;
the real engine path is covered by test_batch_api.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from conserve.batch.results import ResultFiles, answered, recover_file
from conserve.batch.runner import BatchRunner, RunControl
from conserve.batch.store import BatchRow, Counts, FileRow, Store
from conserve.batch.validate import BatchLine, parse_input

CHAT = "/v1/chat/completions"


def line(cid="a", url=CHAT, **over) -> str:
    obj = {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "m"}} | over
    return json.dumps(obj)


def parse(*raw: str, endpoint=CHAT):
    return parse_input("\n".join(raw).encode(), endpoint)


def test_valid_lines_and_blank_lines_skipped():
    p = parse(line("a"), "", "   ", line("b"), "")
    assert p.errors == [] and [(x.line, x.custom_id) for x in p.lines] == [(1, "a"), (4, "b")]


@pytest.mark.parametrize(
    "raw, code, param",
    [
        ("{not json", "invalid_json_line", None),
        ("[1, 2]", "invalid_request", None),
        ('"just a string"', "invalid_request", None),
        (json.dumps({"method": "POST", "url": CHAT, "body": {}}), "missing_required_parameter",
         "custom_id"),
        (json.dumps({"custom_id": "x", "url": CHAT, "body": {}}), "missing_required_parameter",
         "method"),
        (json.dumps({"custom_id": "x", "method": "POST", "body": {}}),
         "missing_required_parameter", "url"),
        (json.dumps({"custom_id": "x", "method": "POST", "url": CHAT}),
         "missing_required_parameter", "body"),
        (line(custom_id=7), "invalid_value", "custom_id"),
        (line(body="text"), "invalid_value", "body"),
        (line(body=[1]), "invalid_value", "body"),
        (line(url=5), "invalid_value", "url"),
        (line(method="GET"), "invalid_value", "method"),
        (line(url="/v1/completions"), "invalid_url", "url"),
        (line(url="/v1/embeddings"), "invalid_url", "url"),
    ],
)  # fmt: skip
def test_structural_errors_name_the_line(raw, code, param):
    p = parse(line("ok"), raw)
    assert len(p.errors) == 1
    e = p.errors[0]
    assert (e.code, e.line, e.param) == (code, 2, param)
    assert e.to_api()["line"] == 2 and e.message.startswith("line 2")


def test_duplicate_custom_id_empty_file_not_utf8_too_many():
    p = parse(line("a"), line("b"), line("a"))
    assert [(e.code, e.line) for e in p.errors] == [("duplicate_custom_id", 3)]
    assert "line 1" in p.errors[0].message
    assert [e.code for e in parse("", "  ").errors] == ["empty_file"]
    assert [e.code for e in parse_input(b"\xff\xfe{}", CHAT).errors] == ["invalid_file"]
    many = parse_input("\n".join(line(str(i)) for i in range(5)).encode(), CHAT, max_lines=4)
    assert [e.code for e in many.errors] == ["too_many_requests"]


def test_cli_mode_accepts_both_endpoints():
    p = parse(line("a"), line("b", url="/v1/completions"), endpoint=None)
    assert p.errors == [] and len(p.lines) == 2


def _ok(cid: str, tokens: int = 3):
    body = {"usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}
    return answered(cid, 200, body)


def _bad(cid: str):
    err = {"message": "nope", "type": "invalid_request_error", "param": None, "code": "x"}
    return answered(cid, 400, {"error": err})


def test_result_files_append_count_and_format(tmp_path):
    rf = ResultFiles(tmp_path / "out.jsonl", tmp_path / "err.jsonl")
    rf.append([_ok("a"), _bad("b"), _ok("c", 2)])
    rf.close()
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    err = [json.loads(x) for x in (tmp_path / "err.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out] == ["a", "c"] and out[0]["error"] is None
    assert out[0]["id"].startswith("batch_req_") and out[0]["response"]["status_code"] == 200
    assert err[0]["response"]["status_code"] == 400
    assert err[0]["error"] == {"code": "x", "message": "nope"}
    again = ResultFiles(tmp_path / "out.jsonl", tmp_path / "err.jsonl")
    assert again.done == {"a", "b", "c"}
    c = again.counts
    assert (c.completed, c.failed, c.input_tokens, c.output_tokens) == (2, 1, 10, 5)
    with pytest.raises(ValueError):
        again.append([_ok("a")])  # never a second result for a custom_id


def test_torn_last_line_is_cut_and_the_line_reruns(tmp_path):
    out = tmp_path / "out.jsonl"
    rf = ResultFiles(out, out)
    rf.append([_ok("a"), _ok("b")])
    rf.close()
    good = out.read_bytes()
    with open(out, "ab") as f:  # a crash mid-write: half a line, no newline
        f.write(_ok("c").to_line().__repr__().encode()[:40])
    assert [x["custom_id"] for x in recover_file(out)] == ["a", "b"]
    assert out.read_bytes() == good
    with open(out, "ab") as f:  # a complete but garbled line, then a good one: cut from there
        f.write(b"garbage\n" + json.dumps(_ok("d").to_line()).encode() + b"\n")
    rf = ResultFiles(out, out)
    assert rf.done == {"a", "b"} and out.read_bytes() == good


def test_store_roundtrip_status_stamps_and_pagination(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    for i in range(5):
        s.add_file(FileRow(f"file-{i}", f"f{i}.jsonl", "batch", 10 + i, 100 + i))
        s.add_batch(BatchRow(f"batch_{i}", f"file-{i}", CHAT, "24h", {"k": "v"}, "m",
                             "validating", 100 + i, 200 + i))  # fmt: skip
    page, more = s.list_batches(limit=2)
    assert [b.id for b in page] == ["batch_4", "batch_3"] and more
    page, more = s.list_batches(limit=10, after="batch_3")
    assert [b.id for b in page] == ["batch_2", "batch_1", "batch_0"] and not more
    with pytest.raises(KeyError):
        s.list_batches(limit=1, after="batch_nope")
    files, more = s.list_files("batch", 3, None, ascending=True)
    assert [f.id for f in files] == ["file-0", "file-1", "file-2"] and more
    s.set_status("batch_1", "in_progress")
    first = s.get_batch("batch_1").times["in_progress_at"]
    s.set_status("batch_1", "in_progress", in_progress_at=first + 99)  # a stamp is kept
    s.set_counts("batch_1", Counts(3, 2, 1, 30, 4, 6))
    s.set_status("batch_1", "failed", errors=[{"code": "c", "message": "m"}])
    s.close()
    b = Store(tmp_path / "db.sqlite").get_batch("batch_1")
    api = b.to_api()
    assert api["status"] == "failed" and api["in_progress_at"] == first
    assert api["failed_at"] is not None and api["errors"]["data"][0]["code"] == "c"
    assert api["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert api["usage"]["total_tokens"] == 36 and api["metadata"] == {"k": "v"}


def _lines(n: int) -> list[BatchLine]:
    return [BatchLine(i + 1, f"id{i}", CHAT, {}) for i in range(n)]


def test_runner_window_order_hook_and_resume(tmp_path):
    in_flight, peak, seen = 0, 0, []

    async def execute(ln: BatchLine):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        seen.append(ln.custom_id)
        await asyncio.sleep(0.001 * (hash(ln.custom_id) % 5))
        in_flight -= 1
        return _ok(ln.custom_id)

    out = tmp_path / "out.jsonl"
    lines = _lines(40)
    rf = ResultFiles(out, out)
    rf.append([_ok("id3"), _ok("id7")])  # done before: never run again
    runner = BatchRunner(lines, rf, execute, order=lambda ls: reversed(ls), window=4)
    assert asyncio.run(runner.run()) == "completed"
    assert peak == 4 and runner.started == 38
    assert seen[:3] == ["id39", "id38", "id37"] and "id3" not in seen
    rf.close()
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(x.custom_id for x in lines)


def test_runner_cancel_aborts_in_flight_and_closes_the_rest(tmp_path):
    aborted = []

    async def execute(ln: BatchLine):
        try:
            await asyncio.sleep(0 if ln.line <= 3 else 30)
        except asyncio.CancelledError:
            aborted.append(ln.custom_id)
            raise
        return _ok(ln.custom_id)

    async def go(runner: BatchRunner, control: RunControl) -> str:
        task = asyncio.create_task(runner.run())
        while runner.results.counts.completed < 3:
            await asyncio.sleep(0.01)
        control.cancel()
        outcome = await task
        await runner.close_unrun("batch_cancelled", "cancelled")
        return outcome

    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    control = RunControl()
    runner = BatchRunner(_lines(20), ResultFiles(out, err), execute, window=5, control=control)
    assert asyncio.run(go(runner, control)) == "cancelled"
    assert sorted(aborted) == ["id3", "id4", "id5", "id6", "id7"]  # the window at the cancel
    runner.results.close()
    done = [json.loads(x) for x in out.read_text().splitlines()]
    rest = [json.loads(x) for x in err.read_text().splitlines()]
    assert {d["custom_id"] for d in done} == {"id0", "id1", "id2"}
    assert len(rest) == 17 and all(r["error"]["code"] == "batch_cancelled" for r in rest)
    assert all(r["response"] is None for r in rest)


def test_runner_expired_deadline(tmp_path):
    async def execute(ln: BatchLine):
        return _ok(ln.custom_id)

    out = tmp_path / "out.jsonl"
    runner = BatchRunner(
        _lines(3), ResultFiles(out, out), execute, control=RunControl(deadline=1.0)
    )
    assert asyncio.run(runner.run()) == "expired" and runner.started == 0
