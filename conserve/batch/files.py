"""File bytes under DATA_DIR/files/<file_id>; their metadata lives in the Store."""

from __future__ import annotations

import codecs
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from conserve.batch.store import FileRow, Store, new_id, now

PURPOSES = ("batch",)  # what can be uploaded; results are purpose "batch_output"


class FileRejected(ValueError):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStorage:
    def __init__(self, root: Path, store: Store) -> None:
        self.root = root / "files"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store

    def path(self, file_id: str) -> Path:
        if "/" in file_id or file_id.startswith("."):
            raise KeyError(file_id)
        return self.root / file_id

    def save_upload(self, src: BinaryIO, filename: str, purpose: str, max_bytes: int) -> FileRow:
        """Copy an uploaded file in, checking it on the way: the purpose, the size, and (for
        batch input) that it is non-empty UTF-8 text. Durable when it returns."""
        if purpose not in PURPOSES:
            raise FileRejected(
                400,
                "invalid_value",
                f"purpose {purpose!r} is not supported; use one of {', '.join(PURPOSES)}",
                "purpose",
            )
        file_id = new_id("file-")
        tmp = self.root / f".upload-{file_id}"
        size = 0
        utf8 = codecs.getincrementaldecoder("utf-8")()
        try:
            with open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileRejected(
                            413, "file_too_large", f"the file is over {max_bytes} bytes", "file"
                        )
                    try:
                        utf8.decode(chunk)
                    except UnicodeDecodeError as e:
                        raise FileRejected(
                            400, "invalid_file", f"the file is not UTF-8 JSONL text: {e}", "file"
                        ) from e
                    out.write(chunk)
                try:
                    utf8.decode(b"", final=True)
                except UnicodeDecodeError as e:
                    raise FileRejected(
                        400, "invalid_file", "the file ends inside a UTF-8 character", "file"
                    ) from e
                if size == 0:
                    raise FileRejected(400, "empty_file", "the file is empty", "file")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(file_id))
            fsync_dir(self.root)
        finally:
            tmp.unlink(missing_ok=True)
        row = FileRow(file_id, filename or "upload.jsonl", purpose, size, now())
        self.store.add_file(row)
        return row

    def adopt(self, file_id: str, src: Path, filename: str, purpose: str) -> FileRow:
        """Publish `src` as file `file_id` through a hard link (src stays where it is).
        Idempotent: repeating it after a crash refreshes the size and keeps one row."""
        dest = self.path(file_id)
        if not dest.exists():
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
            fsync_dir(self.root)
        row = FileRow(file_id, filename, purpose, dest.stat().st_size, now())
        self.store.add_file(row)
        return row

    def link_into(self, file_id: str, dest: Path) -> None:
        """Give a batch its own name for its input file, so that deleting the file does not
        pull it from under a running batch (hard link; a copy where links fail)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            return
        try:
            os.link(self.path(file_id), dest)
        except OSError:
            shutil.copyfile(self.path(file_id), dest)
        fsync_dir(dest.parent)

    def delete(self, file_id: str) -> bool:
        if not self.store.delete_file(file_id):
            return False
        self.path(file_id).unlink(missing_ok=True)
        return True
