"""Parse a batch input file (JSONL) into request lines, or into structural errors.

Structural problems (a line that is not a JSON object with a string `custom_id`, `method`
"POST", the batch's `url` and an object `body`; a duplicate `custom_id`; an empty file) fail
the whole batch at validation, as OpenAI does, with one error per offending line. Whether a
`body` is a valid request is not decided here: the line runs through the same code as the HTTP
endpoint, which answers an invalid body with an error that goes to the error file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from conserve.openai.prepare import REQUEST_BODIES

ENDPOINTS = tuple(REQUEST_BODIES)  # the endpoints a batch may name: those the OpenAI layer answers
MAX_LINES = 50_000  # OpenAI's limit on requests per batch
MAX_ERRORS = 100  # errors reported per failed batch


@dataclass(frozen=True)
class BatchLine:
    line: int  # 1-based line number in the input file
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineError:
    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def to_api(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass
class Parsed:
    lines: list[BatchLine]
    errors: list[LineError]


_REQUIRED = (("custom_id", str), ("method", str), ("url", str), ("body", dict))


def check_line(obj: Any, lineno: int, endpoint: str | None) -> BatchLine | LineError:
    """One parsed JSON value -> a request line, or the first structural problem in it.
    `endpoint` None (the CLI) accepts any supported endpoint per line."""
    if not isinstance(obj, dict):
        return LineError("invalid_request", f"line {lineno} is not a JSON object", lineno)
    for name, kind in _REQUIRED:
        if name not in obj:
            return LineError(
                "missing_required_parameter",
                f"line {lineno}: missing required parameter {name!r}",
                lineno,
                name,
            )
        if not isinstance(obj[name], kind):
            what = "a string" if kind is str else "an object"
            return LineError(
                "invalid_value", f"line {lineno}: {name!r} must be {what}", lineno, name
            )
    if obj["method"] != "POST":
        return LineError("invalid_value", f"line {lineno}: method must be 'POST'", lineno, "method")
    url = obj["url"]
    allowed = ENDPOINTS if endpoint is None else (endpoint,)
    if url not in allowed:
        return LineError(
            "invalid_url",
            f"line {lineno}: url {url!r} does not match the batch endpoint "
            f"({' or '.join(allowed)})",
            lineno,
            "url",
        )
    return BatchLine(lineno, obj["custom_id"], url, obj["body"])


def parse_input(data: bytes, endpoint: str | None, max_lines: int = MAX_LINES) -> Parsed:
    """All lines of an input file. Blank lines are skipped. Lines are kept even when errors
    were found, so that a caller can report every problem at once (up to MAX_ERRORS)."""
    errors: list[LineError] = []
    lines: list[BatchLine] = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Parsed([], [LineError("invalid_file", f"the file is not UTF-8 text: {e}")])
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            errors.append(
                LineError("invalid_json_line", f"line {lineno} is not valid JSON: {e}", lineno)
            )
            continue
        item = check_line(obj, lineno, endpoint)
        if isinstance(item, LineError):
            errors.append(item)
            continue
        first = seen.setdefault(item.custom_id, lineno)
        if first != lineno:
            errors.append(
                LineError(
                    "duplicate_custom_id",
                    f"line {lineno}: custom_id {item.custom_id!r} is already used on line "
                    f"{first}; custom_id must be unique in a batch",
                    lineno,
                    "custom_id",
                )
            )
            continue
        lines.append(item)
    if not lines and not errors:
        errors.append(LineError("empty_file", "the input file has no request lines"))
    if len(lines) > max_lines:
        errors.append(
            LineError(
                "too_many_requests",
                f"the input file has {len(lines)} requests; a batch holds at most {max_lines}",
            )
        )
    return Parsed(lines, errors[:MAX_ERRORS])
