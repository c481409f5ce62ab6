"""Drives every batch of a data directory through OpenAI's lifecycle, and resumes unfinished
ones on start-up.

    validating -> in_progress -> finalizing -> completed
        |              |  \\-> expired (completion window passed)
        v              v
      failed      cancelling -> cancelled

Layout of DATA_DIR: `conserve.db` (the Store), `files/<file_id>` (uploaded and result files),
`batches/<batch_id>/` (the batch's own link to its input, and its output and error files while
it runs; they are published as files, by hard link, when it ends).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conserve.batch.files import FileStorage
from conserve.batch.results import ResultFiles
from conserve.batch.runner import (
    BatchRunner,
    EngineGone,
    Execute,
    OrderHook,
    RunControl,
    fcfs,
)
from conserve.batch.store import ACTIVE, BatchRow, Counts, Store, new_id, now
from conserve.batch.validate import BatchLine, parse_input

log = logging.getLogger(__name__)

COMPLETION_WINDOW_S = {"24h": 24 * 3600}


class BatchManager:
    def __init__(
        self,
        data_dir: Path,
        *,
        order: OrderHook = fcfs,
        window: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store = Store(self.data_dir / "conserve.db")
        self.files = FileStorage(self.data_dir, self.store)
        self.order, self.window = order, window
        self.execute: Execute | None = None
        self.model: str | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._controls: dict[str, RunControl] = {}
        self._stop_if: Callable[[], bool] | None = None
        self._stopping = False
        self.lines_started = 0  # lines sent to the engine since this process started
        self.generation = 0  # engines started: a batch the old one failed resumes on the new

    def workdir(self, batch_id: str) -> Path:
        return self.data_dir / "batches" / batch_id

    async def start(
        self,
        execute: Execute,
        model: str,
        default_window: int,
        stop_if: Callable[[], bool] | None = None,
    ) -> None:
        """Resume every unfinished batch. `stop_if` (polled) pauses all batches when it turns
        true, e.g. while the server drains before exiting. Called again with a new engine's
        `execute` after the old engine died: batches still driven on the old one resume on
        the new one as soon as the old one fails them."""
        self.execute, self.model, self._stop_if = execute, model, stop_if
        self.window = self.window or default_window
        self.generation += 1
        active, _ = self.store.list_batches(limit=1_000_000, statuses=ACTIVE)
        for b in reversed(active):  # oldest first
            if b.id not in self._tasks:
                log.info("resuming batch %s (%s)", b.id, b.status)
                self._spawn(b.id)

    async def stop(self) -> None:
        """Stop feeding lines and abort the ones in flight; unfinished batches stay unfinished
        on disk and resume on the next start."""
        self._stopping = True
        for c in self._controls.values():
            c.stop()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self.store.close()

    def create(
        self, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None
    ) -> BatchRow:
        """A new batch (arguments already checked by the API layer)."""
        batch_id = new_id("batch_")
        self.files.link_into(input_file_id, self.workdir(batch_id) / "input.jsonl")
        created = now()
        row = BatchRow(
            id=batch_id,
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=window,
            metadata=metadata,
            model=self.model,
            status="validating",
            created_at=created,
            expires_at=created + COMPLETION_WINDOW_S[window],
        )
        self.store.add_batch(row)
        self._spawn(batch_id)
        return row

    def cancel(self, batch_id: str) -> BatchRow | None:
        """validating/in_progress -> cancelling; the driver then ends it as cancelled."""
        b = self.store.get_batch(batch_id)
        if b is None or b.status not in ("validating", "in_progress"):
            return b
        self.store.set_status(batch_id, "cancelling")
        control = self._controls.get(batch_id)
        if control is not None:
            control.cancel()
        return self.store.get_batch(batch_id)

    def _spawn(self, batch_id: str) -> None:
        task = asyncio.create_task(self._drive(batch_id), name=f"batch-{batch_id}")
        self._tasks[batch_id] = task

        def forget(_: asyncio.Task) -> None:
            if self._tasks.get(batch_id) is task:
                del self._tasks[batch_id]

        task.add_done_callback(forget)

    async def _drive(self, batch_id: str) -> None:
        generation = self.generation
        try:
            await self._run_batch(batch_id)
        except EngineGone as e:
            if self.generation != generation and not self._stopping:
                log.warning("batch %s resumes on the new engine", batch_id)
                self._spawn(batch_id)
            else:
                log.error("batch %s paused: engine gone (%s); it resumes on restart", batch_id, e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - one broken batch must not take the server down
            log.exception("batch %s failed", batch_id)
            self.store.set_status(
                batch_id,
                "failed",
                errors=[{"code": "server_error", "message": str(e), "param": None, "line": None}],
            )
        finally:
            self._controls.pop(batch_id, None)

    async def _run_batch(self, batch_id: str) -> None:
        b = self.store.get_batch(batch_id)
        assert b is not None
        work = self.workdir(batch_id)
        data = await asyncio.to_thread((work / "input.jsonl").read_bytes)
        parsed = await asyncio.to_thread(parse_input, data, b.endpoint)
        if parsed.errors:
            self.store.set_status(batch_id, "failed", errors=[e.to_api() for e in parsed.errors])
            self._cleanup(batch_id)
            return
        results = await asyncio.to_thread(ResultFiles, work / "output.jsonl", work / "errors.jsonl")
        total = len(parsed.lines)
        self._save_counts(batch_id, total, results)
        status = self.store.get_batch(batch_id).status  # a cancel may have come meanwhile
        if status == "validating":
            self.store.set_status(batch_id, status := "in_progress")
        try:
            if status == "in_progress":
                status = await self._run_lines(b, parsed.lines, results, total)
            if status == "stopped":
                return
            runner = BatchRunner(parsed.lines, results, self._not_executable)
            if status in ("cancelling", "cancelled"):
                await runner.close_unrun("batch_cancelled", "the batch was cancelled")
                status = "cancelled"
            elif status == "expired":
                await runner.close_unrun(
                    "batch_expired", "the batch did not finish within its completion window"
                )
            else:
                self.store.set_status(batch_id, status := "finalizing")
                status = "completed"
            self._finalize(batch_id, results, total, status)
        finally:
            results.close()

    async def _run_lines(
        self, b: BatchRow, lines: list[BatchLine], results: ResultFiles, total: int
    ) -> str:
        assert self.execute is not None
        control = self._controls[b.id] = RunControl(deadline=b.expires_at, stop_if=self._stop_if)
        if self._stopping:
            control.stop()
        if self.store.get_batch(b.id).status == "cancelling":
            control.cancel()
        runner = BatchRunner(
            lines,
            results,
            self.execute,
            order=self.order,
            window=self.window or 1,
            control=control,
            on_results=lambda _: self._save_counts(b.id, total, results),
        )
        try:
            return await runner.run()
        finally:
            self.lines_started += runner.started

    @staticmethod
    async def _not_executable(line: BatchLine) -> Any:
        raise AssertionError("only used to close unrun lines")

    def _save_counts(self, batch_id: str, total: int, results: ResultFiles) -> None:
        c = results.counts
        self.store.set_counts(
            batch_id,
            Counts(total, c.completed, c.failed, c.input_tokens, c.cached_tokens, c.output_tokens),
        )

    def _finalize(self, batch_id: str, results: ResultFiles, total: int, status: str) -> None:
        """Publish the output and error files, then record the final status. Idempotent, so
        a crash anywhere in it is repaired by running it again on the next start."""
        results.close()
        ids: dict[str, Any] = {}
        for kind, path in (("output", results.output), ("error", results.errors)):
            if path.exists() and path.stat().st_size > 0:
                file_id = derived_file_id(batch_id, kind)
                self.files.adopt(file_id, path, f"{batch_id}_{kind}.jsonl", "batch_output")
                ids[f"{kind}_file_id"] = file_id
        self._save_counts(batch_id, total, results)
        self.store.set_status(batch_id, status, **ids)
        self._cleanup(batch_id)

    def _cleanup(self, batch_id: str) -> None:
        shutil.rmtree(self.workdir(batch_id), ignore_errors=True)


def derived_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output or error file, fixed in advance so that publishing it twice
    (after a crash) gives the same file."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]
