"""A host tier that survives an engine restart (`--host-kv-path DIR`).

The host tier's blocks live in `DIR/kv.bin`, mapped into the engine's memory (shared, so a
copy into it is in the operating system's page cache at once and outlives the process). A
journal, `DIR/journal`, says which host block holds which KV block: one line per block saved
("s <block> <key>") or released ("f <block>"), where the key is the block's hash chain over the
tokens of its request up to and including that block (`kv.manager.hash_block`): equal keys mean
equal token prefixes, so equal KV.

A new engine replays the journal: every block still saved is an *orphan* (its request died
with the old engine). A request that starts with the same tokens (a batch line run again, or a
client's retry) adopts the orphans of its leading blocks and copies them back instead of
computing its prompt again; orphans nobody adopts are the first blocks given up when the tier
is full. `DIR/meta.json` records the layout (model, dtype, block shape, block count): a
directory written by another layout is emptied. One engine at a time: `DIR/lock` is locked
while an engine uses the directory (a killed engine's lock goes with it).

What survives is what the page cache kept: an engine crash or SIGKILL loses nothing, a machine
crash may lose the blocks and journal lines the system had not written to disk yet (a block
whose data was lost is then restored wrong only if its journal line survived; the journal is
written after the block's data).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

META, DATA, JOURNAL, LOCK = "meta.json", "kv.bin", "journal", "lock"
KEY_HEX = 32  # a key is a 16-byte hash


class HostKVPathError(RuntimeError):
    """The directory cannot be used (another engine holds it, or it is not writable)."""


class HostFile:
    """The files of a persistent host tier in `directory`, for one `layout`."""

    def __init__(self, directory: str | Path, layout: dict[str, Any]) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.dir / LOCK, "a")  # noqa: SIM115 - held while the engine runs
        except OSError as e:
            raise HostKVPathError(f"--host-kv-path {self.dir}: {e}") from e
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise HostKVPathError(
                f"--host-kv-path {self.dir} is in use by another engine; give each its own"
            ) from None
        self.layout = layout
        self.reused = self._check_layout()
        self._journal = None

    def _check_layout(self) -> bool:
        """True when the directory holds a tier of this layout; otherwise empty it."""
        meta = self.dir / META
        try:
            same = json.loads(meta.read_text()) == self.layout
        except (OSError, ValueError):
            same = False
        if not same:
            for name in (DATA, JOURNAL):
                (self.dir / name).unlink(missing_ok=True)
            meta.write_text(json.dumps(self.layout, sort_keys=True))
        return same

    def tensor(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of `dtype` mapped from the data file (zeros where never written)."""
        return torch.from_file(str(self.dir / DATA), shared=True, size=numel, dtype=dtype)

    def load(self, num_blocks: int) -> dict[int, bytes]:
        """Replay the journal: host block -> key of every block still saved (blocks beyond
        `num_blocks` are dropped), and start a compacted journal holding just those."""
        saved: dict[int, bytes] = {}
        path = self.dir / JOURNAL
        if self.reused and path.exists():
            lines = path.read_text().split("\n")[:-1]  # the last one, unless empty, was cut
            for line in lines:
                parts = line.split()
                try:
                    if parts[0] == "s" and len(parts) == 3 and len(parts[2]) == KEY_HEX:
                        saved[int(parts[1])] = bytes.fromhex(parts[2])
                    elif parts[0] == "f" and len(parts) == 2:
                        saved.pop(int(parts[1]), None)
                except (IndexError, ValueError):
                    continue  # a line cut short by a crash
        saved = {b: k for b, k in saved.items() if 0 <= b < num_blocks}
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"s {b} {k.hex()}\n" for b, k in saved.items()))
        os.replace(tmp, path)
        self._journal = open(path, "a")  # noqa: SIM115 - appended to while the engine runs
        return saved

    def saved(self, entries: Iterable[tuple[int, bytes]]) -> None:
        """Blocks whose data was just copied in, with their keys."""
        self._write("".join(f"s {b} {k.hex()}\n" for b, k in entries))

    def freed(self, blocks: Sequence[int]) -> None:
        self._write("".join(f"f {b}\n" for b in blocks))

    def _write(self, text: str) -> None:
        if text and self._journal is not None:
            self._journal.write(text)
            self._journal.flush()  # into the page cache: it outlives this process

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._lock.close()
