"""The batch jobs of `conserve bench soak`: submitted one after another through the Files and
Batch API, one in three cancelled a few seconds in, each checked when it ends: every
`custom_id` of its input exactly once in its output and error files together."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field

import httpx

FINAL = ("completed", "failed", "cancelled", "expired")


@dataclass
class BatchTally:
    submitted: int = 0
    cancelled: int = 0  # cancel requests sent
    ended: dict[str, int] = field(default_factory=dict)  # final status -> batches
    lines: int = 0  # input lines of the batches that ended
    lost: int = 0  # input custom_ids with no result line
    duplicated: int = 0  # result lines beyond the first for one custom_id
    unfinished: list[str] = field(default_factory=list)  # batch ids still running at the end
    problems: list[str] = field(default_factory=list)


def batch_input(model: str, n: int, rng: random.Random, tag: str) -> tuple[bytes, list[str]]:
    ids = [f"{tag}-{i}" for i in range(n)]
    rows = []
    for cid in ids:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Say something about the number {cid}."}],
            "max_tokens": rng.randint(8, 48),
        }
        rows.append(
            {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n", ids


async def _result_ids(http: httpx.AsyncClient, base: str, file_id: str | None) -> list[str]:
    if not file_id:
        return []
    r = await http.get(f"{base}/v1/files/{file_id}/content")
    r.raise_for_status()
    return [json.loads(x)["custom_id"] for x in r.text.splitlines() if x.strip()]


@dataclass
class BatchJobs:
    base: str
    model: str
    rng: random.Random
    tally: BatchTally = field(default_factory=BatchTally)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, http: httpx.AsyncClient, lines: tuple[int, int] = (20, 60)) -> None:
        """Batches one after another until `stop`; the one running then is awaited by `finish`."""
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                await self._one(http, self.rng.randint(*lines), f"b{n}")
            except (httpx.HTTPError, ValueError, KeyError) as e:
                self.tally.problems.append(f"batch b{n}: {type(e).__name__}: {e}")
                await asyncio.sleep(1.0)

    async def _one(self, http: httpx.AsyncClient, n: int, tag: str) -> None:
        data, ids = batch_input(self.model, n, self.rng, tag)
        up = await http.post(
            f"{self.base}/v1/files",
            files={"file": (f"{tag}.jsonl", data, "application/jsonl")},
            data={"purpose": "batch"},
        )
        up.raise_for_status()
        body = {
            "input_file_id": up.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        r = await http.post(f"{self.base}/v1/batches", json=body)
        r.raise_for_status()
        batch_id = r.json()["id"]
        self.tally.submitted += 1
        cancel_at = self.rng.uniform(2, 8) if self.rng.random() < 1 / 3 else None
        waited = after_stop = 0.0
        while True:
            await asyncio.sleep(0.5)
            waited += 0.5
            after_stop += 0.5 if self.stop.is_set() else 0.0
            if cancel_at is not None and waited >= cancel_at:
                cancel_at = None
                await http.post(f"{self.base}/v1/batches/{batch_id}/cancel")
                self.tally.cancelled += 1
            b = (await http.get(f"{self.base}/v1/batches/{batch_id}")).json()
            if b["status"] in FINAL:
                return await self._check(http, b, ids)
            if after_stop > 300:
                self.tally.unfinished.append(batch_id)
                return

    async def _check(self, http: httpx.AsyncClient, b: dict, ids: list[str]) -> None:
        t = self.tally
        t.ended[b["status"]] = t.ended.get(b["status"], 0) + 1
        got = await _result_ids(http, self.base, b.get("output_file_id"))
        got += await _result_ids(http, self.base, b.get("error_file_id"))
        t.lines += len(ids)
        t.lost += len(set(ids) - set(got))
        t.duplicated += len(got) - len(set(got))
        if set(got) - set(ids):
            t.problems.append(f"{b['id']}: result lines for ids not in its input")
        if b["status"] == "failed":
            t.problems.append(f"{b['id']} failed: {b.get('errors')}")
