"""Result lines in OpenAI's batch output format, appended durably, and recovered after a crash.

The output and error files are the truth for which lines of a batch are done: a line counts as
done once its result line is written, flushed and fsynced. After a crash the files are read
back: a torn last line (or anything after the first line that does not parse) is cut off, and
the custom_ids found are the done set, so a resumed run neither loses nor repeats a line.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conserve.batch.store import Counts


@dataclass(frozen=True)
class LineResult:
    """The result of one request line: an HTTP answer (`status_code` and `body`, success or
    OpenAI error object), or no answer at all (`status_code` None: the line never ran because
    the batch was cancelled or expired)."""

    custom_id: str
    status_code: int | None
    body: dict[str, Any] | None
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200

    def to_line(self) -> dict[str, Any]:
        response = None
        if self.status_code is not None:
            response = {
                "status_code": self.status_code,
                "request_id": f"req_{uuid.uuid4().hex}",
                "body": self.body,
            }
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": self.custom_id,
            "response": response,
            "error": self.error,
        }


def answered(custom_id: str, status_code: int, body: dict[str, Any]) -> LineResult:
    """A line the endpoint answered; an error answer also fills `error` with its code."""
    if status_code == 200:
        return LineResult(custom_id, 200, body)
    err = body.get("error") or {}
    code = err.get("code") or err.get("type") or "invalid_request"
    return LineResult(custom_id, status_code, body, {"code": code, "message": err.get("message")})


def not_run(custom_id: str, code: str, message: str) -> LineResult:
    return LineResult(custom_id, None, None, {"code": code, "message": message})


def usage_of(line: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens of a successful output line."""
    usage = ((line.get("response") or {}).get("body") or {}).get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage.get("prompt_tokens", 0), cached, usage.get("completion_tokens", 0)


def recover_file(path: Path) -> list[dict[str, Any]]:
    """The complete result lines of `path`; cuts the file after the last good one (a line torn
    by a crash mid-write, and anything after it)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good, end = [], 0
    while end < len(data):
        nl = data.find(b"\n", end)
        if nl < 0:
            break  # torn: written without its newline
        try:
            obj = json.loads(data[end:nl])
        except ValueError:
            break
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            break
        good.append(obj)
        end = nl + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return good


class ResultFiles:
    """Appends result lines to an output file (successes) and an error file (the rest); both
    may be the same file. Not thread-safe: one writer per batch."""

    def __init__(self, output: Path, errors: Path) -> None:
        self.output, self.errors = Path(output), Path(errors)
        self.done: set[str] = set()
        self.counts = Counts()
        self._handles: dict[Path, Any] = {}
        for path in {self.output, self.errors}:
            for line in recover_file(path):
                self._count(line)

    def _count(self, line: dict[str, Any]) -> None:
        self.done.add(line["custom_id"])
        status = (line.get("response") or {}).get("status_code")
        if status == 200 and line.get("error") is None:
            self.counts.completed += 1
            prompt, cached, completion = usage_of(line)
            self.counts.input_tokens += prompt
            self.counts.cached_tokens += cached
            self.counts.output_tokens += completion
        else:
            self.counts.failed += 1

    def _handle(self, path: Path):
        f = self._handles.get(path)
        if f is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            f = self._handles[path] = open(path, "ab")  # noqa: SIM115 - kept open until close()
            if created:  # make the new directory entry itself durable
                fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return f

    def append(self, results: list[LineResult]) -> None:
        """Write, flush and fsync `results`; only then are they counted as done."""
        ids = [r.custom_id for r in results]
        if len(set(ids)) != len(ids) or not self.done.isdisjoint(ids):
            raise ValueError("a custom_id already has a result")
        touched = set()
        for r in results:
            path = self.output if r.ok else self.errors
            f = self._handle(path)
            f.write(json.dumps(r.to_line(), ensure_ascii=False).encode() + b"\n")
            touched.add(path)
        for path in touched:
            f = self._handles[path]
            f.flush()
            os.fsync(f.fileno())
        for r in results:
            self._count(r.to_line())

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
