"""Runs the pending lines of one batch through an `execute` function, a bounded window at a time,
and appends each result durably as it finishes.

The runner knows nothing about HTTP or the engine: `execute` answers one line (the server and
the CLI both pass `conserve.batch.execute.line_executor`, the code path of the HTTP
endpoints), and `order` decides which pending line enters next. The default order is the
file's (fcfs); a planner can pass any function from the pending lines to an iterable, consumed
lazily: the runner takes the next line only when a seat in the window frees up. The function
runs in a worker thread (planning a large batch prepares every line; the event loop keeps
serving). An order may yield other objects than the lines it got (a `BatchLine` carrying more,
such as its prepared request); the runner passes them on to `execute`.

Two optional extras let an order learn as the batch runs (the BlendServe planner uses both):
- if the iterable has `observe(custom_id, output_tokens)`, the runner calls it once per line
  result (output_tokens None when the line failed or never ran);
- the iterable may yield `WAIT`: nothing to start now, ask again after the next result. Yielding
  WAIT with nothing in flight is a bug in the order (it could never be woken) and raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from conserve.batch.results import LineResult, ResultFiles, not_run
from conserve.batch.validate import BatchLine

log = logging.getLogger(__name__)

Execute = Callable[[BatchLine], Awaitable[LineResult]]
OrderHook = Callable[[list[BatchLine]], Iterable[BatchLine]]
OnResults = Callable[[list[LineResult]], None]


class _Wait:
    def __repr__(self) -> str:
        return "WAIT"


WAIT = _Wait()  # yielded by an order: "no line to start until the next result"


class Observer(Protocol):
    def observe(self, custom_id: str, output_tokens: int | None) -> None: ...


def fcfs(lines: list[BatchLine]) -> Iterable[BatchLine]:
    """File order."""
    return lines


def output_tokens(result: LineResult) -> int | None:
    """Completion tokens of a successful result, else None."""
    if not result.ok or result.body is None:
        return None
    return (result.body.get("usage") or {}).get("completion_tokens")


class EngineGone(RuntimeError):
    """The engine stopped answering: the batch stays unfinished and resumes on the next start."""


@dataclass
class RunControl:
    """Signals from outside: `cancel()` (the user cancelled), `stop()` (shutdown: leave the
    batch to resume later) and a wall-clock `deadline` (the completion window)."""

    deadline: float | None = None
    stop_if: Callable[[], bool] | None = None  # polled: stop when it turns true
    cancelled: bool = False
    stopped: bool = False

    def __post_init__(self) -> None:
        self.wake = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self.wake.set()

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()

    def expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


class BatchRunner:
    def __init__(
        self,
        lines: list[BatchLine],
        results: ResultFiles,
        execute: Execute,
        *,
        order: OrderHook = fcfs,
        window: int = 512,
        control: RunControl | None = None,
        on_results: OnResults | None = None,
        poll_s: float = 0.5,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.lines, self.results, self.execute = lines, results, execute
        self.order, self.window = order, window
        self.control = control or RunControl()
        self.on_results = on_results
        self.poll_s = poll_s
        self.started = 0  # lines sent to `execute` by this runner (not counting earlier runs)
        self._observer: Observer | None = None
        self.max_in_flight = 0

    def pending(self) -> list[BatchLine]:
        return [line for line in self.lines if line.custom_id not in self.results.done]

    async def run(self) -> str:
        """Run every pending line. Returns "completed", "cancelled", "expired" or "stopped";
        raises EngineGone when the engine died (nothing is recorded for unfinished lines)."""
        plan = await asyncio.to_thread(self.order, self.pending())
        self._observer = plan if callable(getattr(plan, "observe", None)) else None
        upcoming = iter(plan)
        in_flight: dict[asyncio.Task, BatchLine] = {}
        exhausted = False
        try:
            while True:
                outcome = self._interrupted()
                if outcome is not None:
                    return outcome
                while not exhausted and len(in_flight) < self.window:
                    line = next(upcoming, None)
                    if line is None:
                        exhausted = True
                        break
                    if line is WAIT:
                        if not in_flight:
                            raise RuntimeError("the order waits with no line in flight")
                        break
                    if line.custom_id in self.results.done:
                        continue  # an order hook may repeat lines; never run one twice
                    in_flight[asyncio.create_task(self.execute(line))] = line
                    self.started += 1
                self.max_in_flight = max(self.max_in_flight, len(in_flight))
                if not in_flight:
                    return "completed"
                waker = asyncio.create_task(self.control.wake.wait())
                done, _ = await asyncio.wait(
                    [*in_flight, waker], timeout=self.poll_s, return_when=asyncio.FIRST_COMPLETED
                )
                waker.cancel()
                finished = [(t, in_flight.pop(t)) for t in done if t in in_flight]
                if finished:
                    await self._record([self._result_of(t, line) for t, line in finished])
        finally:
            # cancelling a task closes its request stream, which aborts it in the engine
            for t in in_flight:
                t.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    def _interrupted(self) -> str | None:
        if self.control.cancelled:
            return "cancelled"
        if self.control.stopped or (self.control.stop_if is not None and self.control.stop_if()):
            return "stopped"
        if self.control.expired():
            return "expired"
        return None

    def _result_of(self, task: asyncio.Task, line: BatchLine) -> LineResult:
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, EngineGone):
            raise exc
        # A bug answering one line must not stop the batch: record it as a server error.
        log.error("batch line %r failed", line.custom_id, exc_info=exc)
        body = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
        return LineResult(line.custom_id, 500, body, {"code": "server_error", "message": str(exc)})

    async def _record(self, results: list[LineResult]) -> None:
        await asyncio.to_thread(self.results.append, results)
        if self._observer is not None:
            for r in results:
                self._observer.observe(r.custom_id, output_tokens(r))
        if self.on_results is not None:
            self.on_results(results)

    async def close_unrun(self, code: str, message: str) -> None:
        """Give every line without a result an error line `code` (cancelled or expired), so
        that each custom_id appears exactly once in the output or error file."""
        rest = [not_run(line.custom_id, code, message) for line in self.pending()]
        if rest:
            await self._record(rest)
