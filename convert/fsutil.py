"""Small file-system primitives shared by the writer, the manifest and the validators."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mm_convert.errors import MMConvertError, OutputError

PARTIAL_SUFFIX = ".partial"
HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class FileRecord:
    """A finished output file: its path relative to the output folder, size and sha256."""

    path: str
    size: int
    sha256: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def write_error(path: Path, exc: OSError) -> MMConvertError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "the file size limit (ulimit -f) was reached",
    }.get(exc.errno, exc.strerror or str(exc))
    return OutputError(f"{path}: write failed: {reason}; finished files are kept and a rerun resumes")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, fsync it, then give it its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc


MAX_JSON_BYTES = 256 * 1024 * 1024  # the index of a 96k-tensor checkpoint is about 10 MB


def confined(root: Path, rel: object, where: str, also_within: Path | None = None) -> Path:
    """`root / rel` for a relative path read from a file (manifest, journal, index, checksum.json, a
    Hub listing), refused in one line naming `where` unless it stays inside `root`: no absolute
    path, no `..`, nothing that resolves (through a symbolic link) outside `root`. `also_within` is
    the one other place a link may lead (a Hub cache snapshot's files are links into its `blobs/`)."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in Path(rel).parts \
            or rel.startswith("~"):
        raise MMConvertError(f"{where}: names {rel!r}, which is not a path inside {root}; refused")
    path = root / rel
    base = root.resolve()
    resolved = path.resolve()
    bases = [base] + ([also_within.resolve()] if also_within is not None else [])
    if not any(resolved == b or b in resolved.parents for b in bases):
        raise MMConvertError(f"{where}: {rel!r} resolves outside {root} ({resolved}); refused")
    return path


def regular_file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file one may read ("missing", "a directory", ...), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"not readable ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(st.st_mode), "not a regular file")
    return f"{kind}, not a regular file"


def read_small_file(path: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes: a FIFO, a device or a huge file is
    refused before it is read (it could hang, or fill memory)."""
    problem = regular_file_problem(path)
    if problem:
        raise MMConvertError(f"{path}: {problem}")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise MMConvertError(f"{path}: cannot read ({exc.strerror})") from exc
    if len(data) > limit:
        raise MMConvertError(f"{path}: larger than {limit} bytes; refused")
    return data


def read_json_object(path: Path) -> dict:
    """A JSON object from a small regular file, or a one-line MMConvertError saying what is wrong."""
    try:
        obj = json.loads(read_small_file(path).decode("utf-8"))
    except MMConvertError as exc:
        if regular_file_problem(path) == "missing":
            raise MMConvertError(f"{path}: missing") from None
        raise exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MMConvertError(f"{path}: not readable JSON ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise MMConvertError(f"{path}: not a JSON object")
    return obj
