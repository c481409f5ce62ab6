"""Files and Batch API end to end: the real server (the shared session fixture, which has a data
directory and a 1 MiB upload limit) driven by the official `openai` client, and raw HTTP for
the malformed cases."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import API_KEY
from test_server import wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT, COMPL = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def chat_body(model: str, text: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4,
            "temperature": 0} | kw  # fmt: skip


def jsonl(rows: list) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


def req(cid: str, body: dict, url: str = CHAT) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def upload(client, rows: list) -> str:
    return client.files.create(file=("input.jsonl", jsonl(rows)), purpose="batch").id


def wait(client, batch_id: str, until=("completed", "failed", "cancelled", "expired"), t=240):
    deadline = time.monotonic() + t
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in until:
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.2)


def lines_of(client, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    rows = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    by_id = {r["custom_id"]: r for r in rows}
    assert len(by_id) == len(rows), "a custom_id appears twice"
    return by_id


def test_upload_create_poll_download(client, model, server):
    good = [req(f"q{i}", chat_body(model, f"Name a color, {i}.")) for i in range(6)]
    bad_body = chat_body(model, "hi", temperature=-1)
    file_id = upload(client, [*good, req("bad", bad_body)])
    f = client.files.retrieve(file_id)
    assert (f.object, f.purpose, f.status, f.filename) == ("file", "batch", "processed",
                                                           "input.jsonl")  # fmt: skip
    b = client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={"job": "t1"}
    )
    assert b.status == "validating" and b.metadata == {"job": "t1"} and b.object == "batch"
    b = wait(client, b.id)
    assert b.status == "completed", b
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.expires_at
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (
        7, 6, 1)  # fmt: skip
    out, err = lines_of(client, b.output_file_id), lines_of(client, b.error_file_id)
    assert set(out) == {f"q{i}" for i in range(6)} and set(err) == {"bad"}
    # the same answer as the HTTP endpoint (greedy), and the same error
    direct = client.chat.completions.create(**chat_body(model, "Name a color, 3."))
    line = out["q3"]
    assert line["id"].startswith("batch_req_") and line["error"] is None
    body = line["response"]["body"]
    assert line["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == direct.usage.prompt_tokens
    # In bfloat16 (this server's dtype here) greedy tokens can depend on how many requests
    # share a step (README, "dtype"): the six lines decode together, the direct request alone.
    # A batch of that one line runs it alone too, and must give the direct answer exactly.
    one = wait(
        client,
        client.batches.create(
            input_file_id=upload(client, [good[3]]), endpoint=CHAT, completion_window="24h"
        ).id,
    )
    alone = lines_of(client, one.output_file_id)["q3"]["response"]["body"]
    assert alone["choices"][0]["message"] == {
        "role": "assistant",
        "content": direct.choices[0].message.content,
    }
    assert body["service_tier"] == "flex"  # batch lines run as offline requests
    http = httpx.post(f"{server}{CHAT}", json=bad_body, headers=AUTH, timeout=30)
    assert err["bad"]["response"] == {
        "status_code": 400,
        "body": http.json(),
        "request_id": err["bad"]["response"]["request_id"],
    }
    assert err["bad"]["error"]["message"] == http.json()["error"]["message"]
    assert b.usage.input_tokens > 0 and b.usage.output_tokens > 0
    # result files are files: listed, retrievable, deletable
    outputs = client.files.list(purpose="batch_output").data
    assert {b.output_file_id, b.error_file_id} <= {x.id for x in outputs}
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file_id)
    assert wait_idle(server)["integrity_error"] is None


def test_several_batches_at_once_and_pagination(client, model, server):
    ids = []
    for k in range(3):
        if k == 2:
            rows = [req(f"c{i}", {"model": model, "prompt": f"{i} + {i} =", "max_tokens": 2},
                        COMPL) for i in range(5)]  # fmt: skip
        else:
            rows = [req(f"b{k}-{i}", chat_body(model, f"Count to {i}.")) for i in range(5)]
        endpoint = COMPL if k == 2 else CHAT
        b = client.batches.create(
            input_file_id=upload(client, rows), endpoint=endpoint, completion_window="24h"
        )
        ids.append(b.id)
    for k, batch_id in enumerate(ids):
        b = wait(client, batch_id)
        assert b.status == "completed" and b.request_counts.completed == 5
        out = lines_of(client, b.output_file_id)
        want = {f"c{i}" for i in range(5)} if k == 2 else {f"b{k}-{i}" for i in range(5)}
        assert set(out) == want and b.error_file_id is None
        if k == 2:
            assert all(r["response"]["body"]["object"] == "text_completion" for r in out.values())
    # newest first, two at a time
    first = client.batches.list(limit=2)
    assert [x.id for x in first.data] == ids[::-1][:2] and first.has_more
    raw = httpx.get(f"{server}/v1/batches", params={"limit": 2}, headers=AUTH).json()
    assert raw["first_id"] == ids[2] and raw["last_id"] == ids[1] and raw["has_more"]
    nxt = client.batches.list(limit=2, after=first.data[-1].id)
    assert nxt.data[0].id == ids[0]
    every = [x.id for x in client.batches.list(limit=2)]  # follows has_more/after
    assert len(every) == len(set(every)) and set(ids) <= set(every)
    assert wait_idle(server)["integrity_error"] is None


def test_cancel_a_running_batch(client, model, server):
    quick = [req(f"fast{i}", chat_body(model, f"Hi {i}", max_tokens=1)) for i in range(4)]
    slow = [req(f"slow{i}", chat_body(model, f"Story {i}", max_tokens=400, ignore_eos=True))
            for i in range(12)]  # fmt: skip
    b = client.batches.create(
        input_file_id=upload(client, quick + slow), endpoint=CHAT, completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while client.batches.retrieve(b.id).request_counts.completed < 4:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    c = client.batches.cancel(b.id)
    assert c.status in ("cancelling", "cancelled") and c.cancelling_at
    b = wait(client, b.id)
    assert b.status == "cancelled" and b.cancelled_at and b.completed_at is None
    out, err = lines_of(client, b.output_file_id), lines_of(client, b.error_file_id)
    assert {f"fast{i}" for i in range(4)} <= set(out)
    assert set(out) | set(err) == {x["custom_id"] for x in quick + slow}
    assert not set(out) & set(err)
    assert all(e["error"]["code"] == "batch_cancelled" and e["response"] is None
               for e in err.values())  # fmt: skip
    assert b.request_counts.completed == len(out) and b.request_counts.failed == len(err)
    # cancelling again answers the cancelled batch; a completed batch cannot be cancelled
    assert client.batches.cancel(b.id).status == "cancelled"
    state = wait_idle(server)
    assert state["integrity_error"] is None and state["kv_tables"] == 0


def _error(r: httpx.Response, status: int, code: str | None = None, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def _upload_raw(server: str, data: bytes, purpose: str = "batch") -> httpx.Response:
    return httpx.post(f"{server}/v1/files", headers=AUTH, timeout=60,
                      files={"file": ("f.jsonl", data)}, data={"purpose": purpose})  # fmt: skip


def _create_raw(server: str, **body) -> httpx.Response:
    body = {"endpoint": CHAT, "completion_window": "24h"} | body
    return httpx.post(f"{server}/v1/batches", json=body, headers=AUTH, timeout=30)


def test_malformed_uploads_and_create_requests(server, model):
    ok = jsonl([req("a", chat_body(model, "hi"))])
    _error(_upload_raw(server, b""), 400, "empty_file")  # 1 empty file
    _error(_upload_raw(server, b"\x89PNG\r\n\x1a\n\xff\xfe\x00"), 400, "invalid_file")  # 2 binary
    _error(_upload_raw(server, ok * 20_000), 413)  # 3 over --max-file-mb 1
    _error(_upload_raw(server, ok, purpose="fine-tune"), 400, param="purpose")  # 4 purpose
    r = httpx.post(f"{server}/v1/files", headers=AUTH, data={"purpose": "batch"}, timeout=30)
    _error(r, 400, param="file")  # 5 no file part
    good = _upload_raw(server, ok).json()["id"]
    _error(_create_raw(server, input_file_id="file-nope"), 404)  # 6 unknown input file
    _error(_create_raw(server, input_file_id=good, endpoint="/v1/embeddings"), 400,
           param="endpoint")  # 7 unsupported endpoint  # fmt: skip
    _error(_create_raw(server, input_file_id=good, completion_window="1h"), 400,
           param="completion_window")  # 8  # fmt: skip
    _error(_create_raw(server, input_file_id=good, metadata={"k" * 65: "v"}), 400,
           param="metadata")  # 9  # fmt: skip
    _error(_create_raw(server, endpoint=CHAT), 400, param="input_file_id")  # 10 missing field
    for path in ("/v1/batches/batch_nope", "/v1/files/file-nope", "/v1/files/file-nope/content"):
        _error(httpx.get(f"{server}{path}", headers=AUTH), 404)
    _error(httpx.post(f"{server}/v1/batches/batch_nope/cancel", headers=AUTH), 404)
    _error(httpx.get(f"{server}/v1/batches", params={"limit": 0}, headers=AUTH), 400)
    assert httpx.get(f"{server}/health").status_code == 200


def test_malformed_files_fail_the_batch_with_the_line(client, model, server):
    ok = req("ok", chat_body(model, "hi"))
    cases = {  # 11..20: structural problems fail the batch at validation, naming the line
        "invalid_json": ("{custom_id: 1", "invalid_json_line"),
        "array": ("[1, 2, 3]", "invalid_request"),
        "no_custom_id": ({"method": "POST", "url": CHAT, "body": {}}, "missing_required_parameter"),
        "no_body": ({"custom_id": "x", "method": "POST", "url": CHAT},
                    "missing_required_parameter"),
        "custom_id_int": (req(5, {}), "invalid_value"),
        "body_string": ({"custom_id": "x", "method": "POST", "url": CHAT, "body": "hi"},
                        "invalid_value"),
        "method_get": ({"custom_id": "x", "method": "GET", "url": CHAT, "body": {}},
                       "invalid_value"),
        "wrong_url": (req("x", {}, COMPL), "invalid_url"),
        "duplicate": (req("ok", chat_body(model, "again")), "duplicate_custom_id"),
    }  # fmt: skip
    batches = {}
    for name, (bad, _) in cases.items():
        fid = upload(client, [ok, bad])
        batches[name] = client.batches.create(
            input_file_id=fid, endpoint=CHAT, completion_window="24h"
        ).id
    fid = upload(client, ["", "   ", ""])  # only blank lines
    batches["blank"] = client.batches.create(
        input_file_id=fid, endpoint=CHAT, completion_window="24h"
    ).id
    cases["blank"] = (None, "empty_file")
    for name, (_, code) in cases.items():
        b = wait(client, batches[name])
        assert b.status == "failed" and b.failed_at, (name, b)
        errs = b.errors.data
        assert [e.code for e in errs] == [code], (name, errs)
        assert errs[0].line == (None if name == "blank" else 2), (name, errs)
        assert b.output_file_id is None and b.error_file_id is None
    # the model's output file cannot be an input file
    out_file = next(x for x in client.files.list(purpose="batch_output").data)
    _error(_create_raw(server, input_file_id=out_file.id), 400, param="input_file_id")
    assert httpx.get(f"{server}/health").status_code == 200


def test_invalid_request_lines_go_to_the_error_file(client, model, server):
    ctx = client.models.list().data[0].model_extra["max_model_len"]
    bodies = {  # 21..28: the endpoint's own answer, status and message
        "temperature": (chat_body(model, "hi", temperature=5), 400),
        "unknown_model": (chat_body("gpt-9", "hi"), 404),
        "too_long": (chat_body(model, "hello " * ctx), 400),
        "no_messages": ({"model": model, "max_tokens": 2}, 400),
        "stream": (chat_body(model, "hi", stream=True), 400),
        "max_tokens_str": (chat_body(model, "hi", max_tokens="many"), 400),
        "bad_role": ({"model": model, "messages": [{"role": "robot", "content": "x"}]}, 400),
        "n_zero": (chat_body(model, "hi", n=0), 400),
    }
    compl = {"ids_out_of_range": ({"model": model, "prompt": [10**9], "max_tokens": 2}, 400)}
    rows = [req(k, b) for k, (b, _) in bodies.items()] + [req("fine", chat_body(model, "hi"))]
    b = client.batches.create(input_file_id=upload(client, rows), endpoint=CHAT,
                              completion_window="24h")  # fmt: skip
    rows2 = [req(k, b2, COMPL) for k, (b2, _) in compl.items()]
    b2 = client.batches.create(input_file_id=upload(client, rows2), endpoint=COMPL,
                               completion_window="24h")  # fmt: skip
    b, b2 = wait(client, b.id), wait(client, b2.id)
    assert b.status == "completed" and b.request_counts.failed == len(bodies)
    assert set(lines_of(client, b.output_file_id)) == {"fine"}
    err = lines_of(client, b.error_file_id) | lines_of(client, b2.error_file_id)
    for name, (body, status) in (bodies | compl).items():
        url = COMPL if name in compl else CHAT
        line = err[name]
        assert line["response"]["status_code"] == status, (name, line)
        if name != "stream":  # the HTTP endpoint would stream it instead
            http = httpx.post(f"{server}{url}", json=body, headers=AUTH, timeout=60)
            assert http.status_code == status
            assert line["response"]["body"] == http.json(), name
    assert err["too_long"]["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{server}/health").status_code == 200
    assert wait_idle(server)["integrity_error"] is None
