"""The traffic of `conserve bench soak`: online streams (some leaving early), offline flex
requests, batch jobs (some cancelled) and malformed bodies, each outcome tallied by phase (a
phase ends at each SIGKILL of the engine core).

An outcome is "ok", "left" (the client disconnected on purpose), "error" (a failure answered
with an OpenAI error object: an HTTP error with `{"error": {...}}`, or an SSE error event) or
"unanswered" (anything else: a dropped connection, a body that is not an error object). A
malformed body must be answered "error" with a 4xx status."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = (
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "Tell a short story about a lighthouse keeper.",
    "What is the capital of Japan? Answer in one word.",
)
MALFORMED: tuple[tuple[str, Any], ...] = (
    ("invalid JSON", b'{"model": "x", "messages": ['),
    ("negative temperature", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
    ("no messages", {"max_tokens": 4}),
    ("wrong type", {"messages": "hello", "max_tokens": 4}),
    ("too long", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}),
)


@dataclass
class Tally:
    """Outcomes and latencies by phase and kind ("online", "offline", "malformed")."""

    phase: int = 0
    outcomes: dict[tuple[int, str, str], int] = field(default_factory=lambda: defaultdict(int))
    ttft_s: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    e2e_s: dict[tuple[int, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    examples: list[str] = field(default_factory=list)  # a few unanswered failures, for the report

    # failures answered with an error object, by phase, kind and "status: message" (cut)
    errors: dict[tuple[int, str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, outcome: str, e2e_s: float | None = None, note: str = "") -> None:
        self.outcomes[(self.phase, kind, outcome)] += 1
        if outcome == "error":
            self.errors[(self.phase, kind, note[:80])] += 1
        if e2e_s is not None and outcome == "ok":
            self.e2e_s[(self.phase, kind)].append(e2e_s)
        if outcome == "unanswered" and len(self.examples) < 10:
            self.examples.append(f"{kind}: {note[:300]}")


def is_error_object(body: Any) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err


def _error_outcome(status: int, text: str) -> tuple[str, str]:
    try:
        body = json.loads(text)
    except ValueError:
        return "unanswered", f"HTTP {status}, not JSON: {text[:200]}"
    if is_error_object(body):
        return "error", f"{status}: {body['error']['message']}"
    return "unanswered", f"HTTP {status}: {text}"


@dataclass
class Traffic:
    base: str
    model: str
    tally: Tally
    rng: random.Random
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def online_user(self, http: httpx.AsyncClient) -> None:
        """Streams chats one after another with a short think time; one in four leaves after
        its third chunk of text."""
        while not self.stop.is_set():
            leave = self.rng.random() < 0.25
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}],
                "max_tokens": self.rng.randint(16, 64),
                "stream": True,
            }
            await self._stream(http, body, leave)
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    async def _stream(self, http: httpx.AsyncClient, body: dict, leave: bool) -> None:
        t0 = time.monotonic()
        first, chunks = None, 0
        try:
            async with http.stream("POST", f"{self.base}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    outcome, note = _error_outcome(r.status_code, (await r.aread()).decode())
                    return self.tally.add("online", outcome, note=note)
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        if first is not None:
                            self.tally.ttft_s[self.tally.phase].append(first - t0)
                        return self.tally.add("online", "ok", time.monotonic() - t0)
                    obj = json.loads(data)
                    if "error" in obj:
                        if not is_error_object(obj):
                            return self.tally.add("online", "unanswered", note=data)
                        note = f"stream: {obj['error']['message']}"
                        return self.tally.add("online", "error", note=note)
                    if not _has_text(obj):
                        continue  # the role chunk, sent before any token, or the usage
                    chunks += 1
                    first = first or time.monotonic()
                    if leave and chunks >= 3:
                        return self.tally.add("online", "left")
            self.tally.add("online", "unanswered", note="stream ended without [DONE]")
        except (httpx.HTTPError, ValueError) as e:
            self.tally.add("online", "unanswered", note=f"{type(e).__name__}: {e}")

    async def offline_client(self, http: httpx.AsyncClient) -> None:
        """Non-streaming flex completions, back to back."""
        while not self.stop.is_set():
            body = {
                "model": self.model,
                "prompt": self.rng.choice(PROMPTS),
                "max_tokens": self.rng.randint(32, 128),
                "service_tier": "flex",
            }
            t0 = time.monotonic()
            try:
                r = await http.post(f"{self.base}/v1/completions", json=body)
            except httpx.HTTPError as e:
                self.tally.add("offline", "unanswered", note=f"{type(e).__name__}: {e}")
                continue
            if r.status_code == 200:
                self.tally.add("offline", "ok", time.monotonic() - t0)
            else:
                outcome, note = _error_outcome(r.status_code, r.text)
                self.tally.add("offline", outcome, note=note)
                await asyncio.sleep(0.5)  # the engine may be restarting

    async def malformed(self, http: httpx.AsyncClient, every_s: float = 2.0) -> None:
        """A malformed body every `every_s`: it must get a 4xx OpenAI error object."""
        while not self.stop.is_set():
            _, body = self.rng.choice(MALFORMED)
            try:
                if isinstance(body, bytes):
                    r = await http.post(
                        f"{self.base}/v1/chat/completions",
                        content=body,
                        headers={"content-type": "application/json"},
                    )
                else:
                    r = await http.post(
                        f"{self.base}/v1/chat/completions", json={"model": self.model} | body
                    )
                outcome, note = _error_outcome(r.status_code, r.text)
                if outcome == "error" and not 400 <= r.status_code < 500:
                    outcome, note = "unanswered", f"HTTP {r.status_code} for a malformed body"
                self.tally.add("malformed", outcome, note=note)
            except httpx.HTTPError as e:
                self.tally.add("malformed", "unanswered", note=f"{type(e).__name__}: {e}")
            await asyncio.sleep(every_s)


def _has_text(chunk: dict) -> bool:
    """A streamed chat chunk carries generated text (TTFT counts from the first that does)."""
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])
