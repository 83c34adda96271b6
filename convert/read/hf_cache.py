"""Sources in the Hugging Face cache, read in place: `models--org--name/snapshots/<commit>/`.

huggingface_hub keeps one copy of each file under `blobs/`, named by its sha256 (LFS files) or
its git blob sha1 (the rest), and each snapshot is a folder of symbolic links into `blobs/`. A
conversion reads the snapshot through those links, so a 230 GB source is on disk once, however
many revisions point at it. What mm-convert proved about a blob (that its bytes hash to its name)
is kept outside the Hub's cache, in `MM_CONVERT_CACHE/verified/<storage>.json`, keyed by the
blob's name and its size, mtime and inode, so a rerun does not hash 230 GB again and an edited
blob is hashed afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mm_convert.fsutil import HASH_CHUNK, atomic_write_bytes, read_json_object, sha256_file

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
STORAGE_PREFIX = "models--"


def mm_convert_cache() -> Path:
    """mm-convert's own small state (never model bytes): `MM_CONVERT_CACHE` or ~/.cache/mm-convert."""
    return Path(os.environ.get("MM_CONVERT_CACHE", Path.home() / ".cache" / "mm-convert"))


def hub_cache() -> Path:
    """The Hub cache huggingface_hub uses (`HF_HUB_CACHE`, else `HF_HOME/hub`), read as it reads it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def storage_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or hub_cache()) / (STORAGE_PREFIX + repo_id.replace("/", "--"))


@dataclass(frozen=True)
class Snapshot:
    """One commit of one repo in the cache."""

    repo_id: str
    commit: str
    storage: Path  # models--org--name

    @property
    def folder(self) -> Path:
        return self.storage / "snapshots" / self.commit

    @property
    def blobs(self) -> Path:
        return self.storage / "blobs"


def snapshot_of(folder: Path) -> Snapshot | None:
    """The snapshot `folder` is, if it is one (`.../models--org--name/snapshots/<40 hex>`), else None."""
    folder = Path(os.path.abspath(folder))
    storage = folder.parent.parent
    if folder.parent.name != "snapshots" or not COMMIT_RE.match(folder.name) \
            or not storage.name.startswith(STORAGE_PREFIX):
        return None
    org_name = storage.name[len(STORAGE_PREFIX):]
    if org_name.count("--") != 1:  # "--" cannot occur in a Hub name, so the split is unambiguous
        return None
    return Snapshot(org_name.replace("--", "/"), folder.name, storage)


def blob_of(snapshot: Snapshot, rel: str) -> Path | None:
    """The blob a snapshot file links to, when it is a link into this repo's `blobs/`."""
    path = snapshot.folder / rel
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target if target.parent == snapshot.blobs.resolve() else None


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_hash_matches(blob: Path, on_bytes: Callable[[int], None] | None = None) -> bool:
    """Whether a blob's bytes hash to its name (sha256 for LFS blobs, git sha1 for the rest)."""
    name = blob.name
    if SHA256_RE.match(name):
        return sha256_file(blob, on_bytes) == name
    if COMMIT_RE.match(name):
        ok = git_blob_sha1(blob) == name
        if on_bytes:
            on_bytes(blob.stat().st_size)
        return ok
    return False


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@dataclass
class VerifiedBlobs:
    """The blobs of one repo whose bytes were hashed and found equal to their names, with the stat
    they had then (a blob whose stat changed is no longer proven)."""

    path: Path
    blobs: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, storage: Path) -> "VerifiedBlobs":
        path = mm_convert_cache() / "verified" / (storage.name + ".json")
        try:
            blobs = read_json_object(path).get("blobs", {}) if path.is_file() else {}
        except Exception:  # noqa: BLE001 - a damaged record only means hashing again
            blobs = {}
        return cls(path, {k: v for k, v in blobs.items() if isinstance(v, list)})

    def proven(self, blob: Path) -> bool:
        try:
            return self.blobs.get(blob.name) == _stat_key(blob)
        except OSError:
            return False

    def add(self, blob: Path) -> None:
        self.blobs[blob.name] = _stat_key(blob)

    def save(self) -> None:
        atomic_write_bytes(self.path, (json.dumps({"blobs": self.blobs}, indent=1, sort_keys=True) + "\n").encode())


def proven_sha256s(snapshot: Snapshot) -> dict[str, str]:
    """sha256 of each LFS file of a snapshot whose blob was proven to hash to its name."""
    verified = VerifiedBlobs.load(snapshot.storage)
    out = {}
    for path in sorted(snapshot.folder.rglob("*")):
        blob = blob_of(snapshot, path.relative_to(snapshot.folder).as_posix())
        if blob is not None and SHA256_RE.match(blob.name) and verified.proven(blob):
            out[path.relative_to(snapshot.folder).as_posix()] = blob.name
    return out
