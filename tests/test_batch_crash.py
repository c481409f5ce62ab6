"""Crash safety: a 300-line batch killed with SIGKILL part-way (server, then CLI), restarted on
the same data: every custom_id exactly once, and the lines finished before the crash kept
byte for byte (their random batch_req ids prove they were not recomputed) and not run again
(the engine's finished-request counter / the CLI's run count)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from conftest import API_KEY, start_server, stop_server
from test_server import wait_idle

N = 300
ENGINE = ("--max-num-seqs", "16")  # a window of 32 lines: results arrive in waves


def _rows(model: str) -> list[dict]:
    return [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": model,
                "prompt": f"Item {i}: the",
                "max_tokens": 1 + i % 3,
                "temperature": 0,
            },
        }  # fmt: skip
        for i in range(N)
    ]


def _wait_lines(path: Path, at_least: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_bytes().count(b"\n") >= at_least):
        assert proc.poll() is None, "exited before the crash point"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the process and its engine core, as a crash of the machine's process would."""
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    proc.send_signal(signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    proc.wait(30)


def _tear(path: Path) -> None:
    """Leave half a line at the end, as a crash in the middle of a write would."""
    with open(path, "ab") as f:
        f.write(b'{"id": "batch_req_torn", "custom_id": "line-')


def _check_once(lines: list[bytes], want: set[str]) -> None:
    ids = [json.loads(x)["custom_id"] for x in lines]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    assert set(ids) == want


def _finished_offline(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    pat = r'conserve:request_success_total\{class="offline",finished_reason="(\w+)"\} ([\d.e+]+)'
    return sum(float(v) for reason, v in re.findall(pat, text) if reason != "abort")


def test_server_killed_mid_batch_resumes_on_restart(tmp_path):
    data = tmp_path / "data"
    proc, base = start_server("--data-dir", str(data), *ENGINE)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
        model = client.models.list().data[0].id
        rows = "\n".join(json.dumps(r) for r in _rows(model)).encode()
        fid = client.files.create(file=("crash.jsonl", rows), purpose="batch").id
        b = client.batches.create(
            input_file_id=fid, endpoint="/v1/completions", completion_window="24h"
        )
        work = data / "batches" / b.id / "output.jsonl"
        _wait_lines(work, 40, proc)
    finally:
        _kill9(proc)
    before = work.read_bytes().splitlines(keepends=True)
    assert 40 <= len(before) < N, len(before)
    _tear(work)
    proc, base = start_server("--data-dir", str(data), *ENGINE)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
        deadline = time.monotonic() + 300
        while (b := client.batches.retrieve(b.id)).status != "completed":
            assert b.status == "in_progress" and time.monotonic() < deadline, b
            time.sleep(0.2)
        assert b.request_counts.total == N and b.request_counts.completed == N
        final = client.files.content(b.output_file_id).content.splitlines(keepends=True)
        assert final[: len(before)] == before  # kept byte for byte
        _check_once(final, {f"line-{i}" for i in range(N)})
        assert b.error_file_id is None
        # the restarted engine ran exactly the lines without a result
        assert _finished_offline(base) == N - len(before)
        assert wait_idle(base)["integrity_error"] is None
    finally:
        stop_server(proc)


def test_cli_killed_mid_run_resumes(tmp_path, default_tokenizer):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in _rows("SmolLM2-135M-Instruct")) + "\n")
    cmd = [sys.executable, "-m", "conserve.cli", "batch", "run", str(src), "-o", str(out),
           "--errors", str(tmp_path / "err.jsonl"), "--no-progress", *ENGINE]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_lines(out, 40, proc)
    finally:
        _kill9(proc)
    before = out.read_bytes().splitlines(keepends=True)
    assert 40 <= len(before) < N, len(before)
    _tear(out)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(before)} of {N} lines already done" in rerun.stderr
    assert f"({N - len(before)} run now)" in rerun.stderr
    final = out.read_bytes().splitlines(keepends=True)
    assert final[: len(before)] == before
    _check_once(final, {f"line-{i}" for i in range(N)})
    assert not (tmp_path / "err.jsonl").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already have results" in again.stderr
    assert out.read_bytes().splitlines(keepends=True) == final


def test_cli_missing_input_is_one_clear_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "conserve.cli", "batch", "run", str(tmp_path / "nope.jsonl"),
         "-o", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip() == f"conserve: error: input file not found: {tmp_path / 'nope.jsonl'}"
