"""Durable metadata of files and batches: one SQLite database in WAL mode.

The database holds what the API shows (file and batch objects, status, timestamps, counts).
Which lines of a batch are done is *not* kept here: the appended result files are the truth for
that (see `results.py`), and the counts stored here are re-derived from them on start-up.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OpenAI's batch lifecycle. Active statuses resume after a restart.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    input_file_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,
    model TEXT,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0
);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class FileRow:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class Counts:
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


@dataclass
class BatchRow:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    model: str | None
    status: str
    created_at: int
    expires_at: int
    times: dict[str, int | None] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    counts: Counts = field(default_factory=Counts)

    def to_api(self) -> dict[str, Any]:
        c = self.counts
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            **{name: self.times.get(name) for name in TIMESTAMPS},
            "request_counts": {"total": c.total, "completed": c.completed, "failed": c.failed},
            "usage": {
                "input_tokens": c.input_tokens,
                "input_tokens_details": {"cached_tokens": c.cached_tokens},
                "output_tokens": c.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": c.input_tokens + c.output_tokens,
            },
            "metadata": self.metadata,
        }


class Store:
    """Thread-safe (one connection behind a lock); every write commits at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns (the WAL is fsynced), not only in the
            # page cache; commits are few (per flushed group of result lines), so it is cheap.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # files

    def add_file(self, row: FileRow) -> None:
        self._exec(
            "INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET bytes = excluded.bytes",
            (row.id, row.filename, row.purpose, row.bytes, row.created_at),
        )

    def get_file(self, file_id: str) -> FileRow | None:
        rows = self._exec(
            "SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = ?", (file_id,)
        )
        return FileRow(**dict(rows[0])) if rows else None

    def list_files(
        self, purpose: str | None, limit: int, after: str | None, ascending: bool
    ) -> tuple[list[FileRow], bool]:
        """Up to `limit` files after the cursor file `after`, and whether more follow."""
        where, args = self._cursor("files", after, ascending)
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        rows = self._exec(
            "SELECT id, filename, purpose, bytes, created_at FROM files"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?",
            (*args, limit + 1),
        )
        return [FileRow(**dict(r)) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

    def _cursor(self, table: str, after: str | None, ascending: bool) -> tuple[list[str], list]:
        if after is None:
            return [], []
        rows = self._exec(f"SELECT seq FROM {table} WHERE id = ?", (after,))
        if not rows:
            raise KeyError(after)
        return [f"seq {'>' if ascending else '<'} ?"], [rows[0]["seq"]]

    # batches

    def add_batch(self, b: BatchRow) -> None:
        self._exec(
            "INSERT INTO batches (id, input_file_id, endpoint, completion_window, metadata, "
            "model, status, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                b.id,
                b.input_file_id,
                b.endpoint,
                b.completion_window,
                None if b.metadata is None else json.dumps(b.metadata),
                b.model,
                b.status,
                b.created_at,
                b.expires_at,
            ),
        )

    def get_batch(self, batch_id: str) -> BatchRow | None:
        rows = self._exec("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return _batch(rows[0]) if rows else None

    def list_batches(
        self, limit: int, after: str | None = None, statuses: tuple[str, ...] | None = None
    ) -> tuple[list[BatchRow], bool]:
        """Newest first, as OpenAI lists them."""
        where, args = self._cursor("batches", after, ascending=False)
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        rows = self._exec(
            "SELECT * FROM batches"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY seq DESC LIMIT ?",
            (*args, limit + 1),
        )
        return [_batch(r) for r in rows[:limit]], len(rows) > limit

    def set_status(self, batch_id: str, status: str, **fields: Any) -> None:
        """Move a batch to `status`, stamping `<status>_at` (if the lifecycle has one) unless
        it is already set, plus any other columns given."""
        stamp = f"{status}_at"
        if stamp in TIMESTAMPS:
            fields.setdefault(stamp, now())
        sets = ["status = ?"] + [
            f"{k} = COALESCE({k}, ?)" if k in TIMESTAMPS else f"{k} = ?" for k in fields
        ]
        values = [json.dumps(v) if k == "errors" else v for k, v in fields.items()]
        sql = f"UPDATE batches SET {', '.join(sets)} WHERE id = ?"
        self._exec(sql, (status, *values, batch_id))

    def set_counts(self, batch_id: str, c: Counts) -> None:
        self._exec(
            "UPDATE batches SET total = ?, completed = ?, failed = ?, input_tokens = ?, "
            "cached_tokens = ?, output_tokens = ? WHERE id = ?",
            (
                c.total,
                c.completed,
                c.failed,
                c.input_tokens,
                c.cached_tokens,
                c.output_tokens,
                batch_id,
            ),
        )


def _batch(r: sqlite3.Row) -> BatchRow:
    return BatchRow(
        id=r["id"],
        input_file_id=r["input_file_id"],
        endpoint=r["endpoint"],
        completion_window=r["completion_window"],
        metadata=None if r["metadata"] is None else json.loads(r["metadata"]),
        model=r["model"],
        status=r["status"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        times={name: r[name] for name in TIMESTAMPS},
        output_file_id=r["output_file_id"],
        error_file_id=r["error_file_id"],
        errors=None if r["errors"] is None else json.loads(r["errors"]),
        counts=Counts(
            r["total"],
            r["completed"],
            r["failed"],
            r["input_tokens"],
            r["cached_tokens"],
            r["output_tokens"],
        ),
    )
