"""Writing output files so that nothing half-written ever carries a final name.

A conversion works inside `OUT/.mm-convert/` (output_format.WORK_DIR):

- `lock`: held (flock) for the whole run; a second conversion into the same folder is refused.
- `fingerprint.json`: what this conversion is (source identity, recipe, profile, shape, tool
  version); a rerun with a different fingerprint is refused unless asked to start over.
- `staging/<path>.partial`: a file being written, hashed as it is written (no second pass).
- `staging/<path>`: a finished file: flushed, fsynced, renamed, then recorded in
- `journal.jsonl`: one line per finished file (path, size, sha256), fsynced.

When every file is staged, `commit` moves them to their final names; the manifest is written last.
A rerun after a crash keeps staged files whose bytes still match the journal and redoes the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable

from mm_convert.errors import MMConvertError, OutputError
from mm_convert.fsutil import (
    PARTIAL_SUFFIX,
    FileRecord,
    atomic_write_bytes,
    confined,
    fsync_dir,
    read_small_file,
    sha256_file,
    write_error,
)
from mm_convert.output_format import WORK_DIR


class StagedFile:
    """One output file written front to back, hashed on the way, renamed only when complete.

    With `header_last`, the first bytes written are a placeholder the caller overwrites when the
    file is complete (`finish(header=...)`): then the sha256 is taken by reading the finished file
    back (it is still in the page cache), and `truncate` can take back the tail just written.
    """

    def __init__(self, work: "WorkDir", rel_path: str, expected_size: int | None = None, header_last: bool = False):
        self.work = work
        self.rel_path = rel_path
        self.final = work.staged_path(rel_path)
        self.partial = self.final.with_name(self.final.name + PARTIAL_SUFFIX)
        self.expected_size = expected_size
        self.header_last = header_last
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._hash = None if header_last else hashlib.sha256()
        self._written = 0
        try:
            self._f = open(self.partial, "w+b" if header_last else "wb")
        except OSError as exc:
            raise write_error(self.partial, exc) from exc

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            self.abort()
            raise write_error(self.partial, exc) from exc
        if self._hash is not None:
            self._hash.update(data)
        self._written += len(data)

    def truncate(self, size: int) -> None:
        """Take back everything after `size` bytes (header_last files only: nothing was hashed yet)."""
        if self._hash is not None or not 0 <= size <= self._written:
            raise ValueError(f"{self.partial}: cannot truncate to {size} of {self._written} bytes")
        try:
            self._f.seek(size)
            self._f.truncate()
        except OSError as exc:
            self.abort()
            raise write_error(self.partial, exc) from exc
        self._written = size

    def finish(self, header: bytes | None = None, keys: list[str] | None = None) -> FileRecord:
        """Flush, fsync, rename and journal (with `keys`, the content keys of its planned tensors)."""
        if self.expected_size is not None and self._written != self.expected_size:
            self.abort()
            raise OutputError(f"{self.partial}: wrote {self._written} bytes, planned {self.expected_size}")
        try:
            if header is not None:
                self._f.flush()
                os.pwrite(self._f.fileno(), header, 0)
            self._f.flush()
            os.fsync(self._f.fileno())
            if self._hash is None:
                self._f.seek(0)
                self._hash = hashlib.file_digest(self._f, "sha256")
            self._f.close()
            os.replace(self.partial, self.final)
            fsync_dir(self.final.parent)
        except OSError as exc:
            self.abort()
            raise write_error(self.partial, exc) from exc
        record = FileRecord(self.rel_path, self._written, self._hash.hexdigest())
        self.work.record(record, keys)
        return record

    def abort(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()  # flushes what is buffered: on a full disk that fails again
            except OSError:
                pass  # the file is removed next; the first error is the one reported
        self.partial.unlink(missing_ok=True)


class WorkDir:
    """The hidden work area of one conversion into an output folder (see the module docstring)."""

    def __init__(self, out: Path):
        self.out = out
        self.root = out / WORK_DIR
        self.staging = self.root / "staging"
        self.journal_path = self.root / "journal.jsonl"
        self.fingerprint_path = self.root / "fingerprint.json"
        self._lock_fd: int | None = None
        self._journal_lock = threading.Lock()  # files are finished on several threads

    # -- locking ---------------------------------------------------------------------------------

    def acquire(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.root, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{self.out}: another conversion is writing into this folder (lock held)") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- fingerprint -------------------------------------------------------------------------------

    def check_fingerprint(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Start fresh, resume a matching run, or refuse (saying what differs) unless overwriting."""
        if self.fingerprint_path.exists():
            try:
                previous = json.loads(read_small_file(self.fingerprint_path))
            except (MMConvertError, ValueError):
                previous = None
            if previous != fingerprint:
                if not overwrite:
                    raise OutputError(
                        f"{self.out}: an unfinished conversion with a different "
                        f"{describe_difference(previous, fingerprint)} is here; rerun it as it was, or pass --overwrite"
                    )
                self.clear()
        if not self.fingerprint_path.exists():
            atomic_write_bytes(self.fingerprint_path, json.dumps(fingerprint, indent=2, sort_keys=True).encode())

    def clear(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.journal_path.unlink(missing_ok=True)
        self.fingerprint_path.unlink(missing_ok=True)

    # -- staging and journal -------------------------------------------------------------------------

    def staged_path(self, rel_path: str) -> Path:
        return self.staging / rel_path

    def record(self, rec: FileRecord, keys: list[str] | None = None) -> None:
        entry = {"path": rec.path, "size": rec.size, "sha256": rec.sha256}
        if keys is not None:
            entry["keys"] = keys
        line = json.dumps(entry) + "\n"
        try:
            with self._journal_lock, open(self.journal_path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise write_error(self.journal_path, exc) from exc

    def journal(self) -> dict[str, FileRecord]:
        return {path: rec for path, (rec, _) in self._journal().items()}

    def journal_keys(self, rel_path: str) -> list[str] | None:
        """The content keys a journaled presharded file was written with."""
        entry = self._journal().get(rel_path)
        return entry[1] if entry else None

    def _journal(self) -> dict[str, tuple[FileRecord, list[str] | None]]:
        records: dict[str, tuple[FileRecord, list[str] | None]] = {}
        if not self.journal_path.exists():
            return records
        for line in read_small_file(self.journal_path).decode("utf-8", "replace").splitlines():
            try:
                d = json.loads(line)
                confined(self.out, d["path"], f"{self.journal_path}: entry")
                keys = d.get("keys")
                if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                    continue
                records[d["path"]] = (FileRecord(d["path"], int(d["size"]), d["sha256"]), keys)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                continue  # a torn last line from a crash: that file is simply redone
        return records

    def verified(
        self, rel_path: str, planned_size: int, known: FileRecord | None = None, on_bytes: Callable[[int], None] | None = None
    ) -> FileRecord | None:
        """A record for a file that is already done: staged (per the journal) or in its final place.

        `known` is what an earlier, completed conversion's manifest says of the final file. Either
        way the bytes are hashed again: a record alone is never trusted.
        """
        journaled = self.journal().get(rel_path)
        final = self.out / rel_path
        # A crash during commit can leave a journaled file already moved to its final name.
        candidates = [(journaled, self.staged_path(rel_path)), (journaled, final), (known, final)]
        for rec, path in candidates:
            # A presharded file may come out smaller than planned (a content repeated in it is kept once).
            if rec is None or rec.size > planned_size or not path.is_file() or path.stat().st_size != rec.size:
                continue
            if sha256_file(path, on_bytes) == rec.sha256:
                return rec
        return None

    def open(self, rel_path: str, expected_size: int | None = None, header_last: bool = False) -> StagedFile:
        return StagedFile(self, rel_path, expected_size, header_last)

    def commit(self, rel_paths: list[str]) -> None:
        """Move staged files to their final names (each rename atomic), then drop the work area."""
        touched: set[Path] = set()
        for rel in rel_paths:
            src, dst = self.staged_path(rel), self.out / rel
            if not src.exists():
                continue  # already in its final place (verified before it was planned as done)
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(src, dst)
            except OSError as exc:
                raise write_error(dst, exc) from exc
            touched.add(dst.parent)
        for d in touched:
            fsync_dir(d)

    def remove(self) -> None:
        """After a completed commit: drop the work area, lock included (this process still holds it)."""
        shutil.rmtree(self.root, ignore_errors=True)


def describe_difference(previous: Any, current: dict[str, Any]) -> str:
    """Name the first fingerprint fields that differ, for a one-line refusal."""
    if not isinstance(previous, dict):
        return "fingerprint (unreadable)"
    keys = sorted(set(previous) | set(current))
    diffs = [k for k in keys if previous.get(k) != current.get(k)]
    parts = []
    for k in diffs[:3]:
        a, b = previous.get(k), current.get(k)
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            parts.append(k)
        else:
            parts.append(f"{k} (was {a!r}, now {b!r})")
    return ", ".join(parts) or "fingerprint"
