"""Small file-system primitives shared by the writer, the manifest and the validators."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from convert.errors import ConvertError

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


def write_error(path: Path, exc: OSError) -> ConvertError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "the file size limit (ulimit -f) was reached",
    }.get(exc.errno, exc.strerror or str(exc))
    return ConvertError(f"{path}: write failed: {reason}; finished files are kept and a rerun resumes")


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


def read_json_object(path: Path) -> dict:
    """A JSON object from a file, or a one-line ConvertError saying what is wrong with it."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConvertError(f"{path}: not readable JSON ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return obj
