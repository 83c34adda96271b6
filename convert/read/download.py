"""Download a pinned source from the Hub: into the Hugging Face cache (read in place by convert) or
a plain folder, disk-checked, sha256-verified against the Hub's LFS oids, resumable, offline from the cache.

Only public `huggingface_hub` calls present in 1.x and 2.x are used (`HfApi.model_info`,
`list_repo_tree`, `snapshot_download`). The client neither checks a download's sha256 (only its size)
nor puts a timeout on transfers, so every LFS file is hashed against the Hub's oid, and transfers run
with a 60 s inactivity timeout: a stalled transfer fails instead of hanging, and a rerun resumes.
"""
from __future__ import annotations
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from mm_convert import output_format
from mm_convert.plan import presharded
from mm_convert.errors import HubError, MMConvertError
from mm_convert.fsutil import atomic_write_bytes, confined, read_json_object, sha256_file
from mm_convert.read.hf_cache import (
    Snapshot,
    VerifiedBlobs,
    blob_of,
    content_hash_matches,
    hub_cache,
    proven_sha256s,
    snapshot_of,
    storage_folder,
)
from mm_convert.progress import byte_bar
from mm_convert.read.source import INDEX_NAME, PICKLE_SUFFIXES
from mm_convert.hub_client import (
    DISK_MARGIN,
    DOWNLOAD_RECORD,
    hub_api,
    bounded_timeouts,
    hub_bars,
    hub_error,
    check_repo_id,
    check_revision,
    wanted,
)

@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the Hub's sha256 of the content
    blob_id: str  # git blob sha1


@dataclass
class DownloadRecord:
    """What `download` fetched and verified, kept beside the files (`.mm-convert-download.json`)."""

    repo_id: str
    revision: str  # the commit sha the requested revision resolved to
    requested_revision: str | None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> size, sha256, mtime_ns

    @classmethod
    def for_snapshot(cls, snapshot: Snapshot, requested_revision: str | None = None) -> "DownloadRecord":
        """What is proven about a cache snapshot: its repo and commit from its place in the cache,
        and the sha256 of each LFS file whose blob was hashed and found equal to its name."""
        files = {}
        for rel, sha in proven_sha256s(snapshot).items():
            st = (snapshot.folder / rel).stat()
            files[rel] = {"size": st.st_size, "sha256": sha, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        return cls(snapshot.repo_id, snapshot.commit, requested_revision, files)

    @classmethod
    def load(cls, folder: Path) -> "DownloadRecord | None":
        """The record of a plain download folder, or what is known about a Hub cache snapshot."""
        if not (folder / DOWNLOAD_RECORD).exists():
            snapshot = snapshot_of(folder)
            return cls.for_snapshot(snapshot) if snapshot is not None else None
        try:
            d = read_json_object(folder / DOWNLOAD_RECORD)
            files = d.get("files", {})
            for rel in files:
                confined(folder, rel, f"{folder / DOWNLOAD_RECORD}: files entry")
            return cls(str(d["repo_id"]), str(d["revision"]), d.get("requested_revision"), dict(files))
        except MMConvertError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, folder: Path) -> None:
        atomic_write_bytes(folder / DOWNLOAD_RECORD, (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode())

    def sha256s(self, folder: Path) -> dict[str, str]:
        """The Hub's sha256 of each file that is still the one verified on download (same size,
        modification time and inode): an edited file's bytes are no longer what the Hub hashed."""
        out = {}
        snapshot = snapshot_of(folder)
        for rel, f in self.files.items():
            if not f.get("sha256"):
                continue
            try:
                st = confined(folder, rel, f"{folder}: a downloaded file",
                              also_within=snapshot.blobs if snapshot else None).stat()
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == (f.get("size"), f.get("mtime_ns")) and f.get("inode", st.st_ino) == st.st_ino:
                out[rel] = f["sha256"]
        return out


@dataclass(frozen=True)
class DownloadResult:
    folder: Path
    record: DownloadRecord
    downloaded: list[str]
    reused: list[str]
    seconds: float


def remote_files(repo_id: str, revision: str | None) -> tuple[str, list[RemoteFile]]:
    """Resolve `revision` to a commit sha and list the repo's files at that commit, with sizes and LFS sha256."""
    check_repo_id(repo_id)
    check_revision(revision)
    api = hub_api()
    try:
        info = api.model_info(repo_id, revision=revision)
        sha = info.sha
        if not sha:
            raise HubError(f"{repo_id}@{revision}: the Hub returned no commit sha")
        entries = api.list_repo_tree(repo_id, revision=sha, recursive=True)
        files = [
            RemoteFile(e.path, int(e.size), e.lfs.sha256 if getattr(e, "lfs", None) else None, e.blob_id)
            for e in entries if hasattr(e, "size")
        ]
        for f in files:  # a listing is input like any other: no path may leave the download folder
            confined(Path("."), f.path, f"{repo_id}@{sha[:12]}: the Hub's file listing")
    except MMConvertError:
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types; report one line
        raise hub_error(f"{repo_id}@{revision or 'main'}: cannot read the repository", exc) from exc
    return sha, files


def _file_ok(folder: Path, rec: dict[str, Any] | None, remote: RemoteFile) -> bool:
    path = folder / remote.path
    if rec is None or not path.is_file():
        return False
    st = path.stat()
    return st.st_size == remote.size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns") and \
        rec.get("sha256") == remote.sha256


@bounded_timeouts()
def download(repo_id: str, folder: str | Path | None = None, revision: str | None = None, quiet: bool = False,
             max_workers: int = 8) -> DownloadResult:
    """Fetch what a conversion needs from a pinned revision and verify every file's hash.

    With no `folder` the files go into the Hugging Face cache (`HF_HUB_CACHE`), as `hf download`
    puts them, and the result's folder is the snapshot of the resolved commit: a conversion reads it
    in place, so the weights are on disk once. With `HF_HUB_OFFLINE=1` nothing is fetched: the
    cached snapshot is used, or what is missing from it is named. With a `folder`, a plain copy is
    made there instead. Either way disk space is checked first and every large file's sha256 is
    compared with the Hub's LFS oid; a rerun skips what was already verified."""
    if folder is None:
        return _download_to_cache(repo_id, revision, quiet, max_workers)
    started = time.monotonic()
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HubError(f"{folder}: exists and is not a folder")
    sha, files = remote_files(repo_id, revision)
    needed = _needed(repo_id, sha, files)
    folder.mkdir(parents=True, exist_ok=True)
    record = DownloadRecord.load(folder)
    if record is not None and (record.repo_id, record.revision) != (repo_id, sha):
        raise HubError(
            f"{folder}: holds {record.repo_id}@{record.revision[:12]}, not {repo_id}@{sha[:12]}; use another folder"
        )
    record = record or DownloadRecord(repo_id, sha, revision)
    done = [f for f in needed if _file_ok(folder, record.files.get(f.path), f)]
    todo = [f for f in needed if f not in done]
    _check_free_space(folder, repo_id, sum(f.size - _partial_size(folder, f) for f in todo))

    if todo:
        _fetch(repo_id, sha, [f.path for f in todo], quiet, max_workers, local_dir=folder)
        bad: list[HubError] = []
        with byte_bar(sum(f.size for f in todo), "verify sha256", quiet) as bar:
            for f in todo:
                try:
                    _verify(folder, f, record, bar.update)
                except MMConvertError as exc:
                    bad.append(exc)  # keep verifying the others: a rerun then fetches only the bad ones
                record.save(folder)  # after each file: an interrupted verification keeps what it proved
        _raise_first(bad)
    record.save(folder)
    _check_shards_listed(folder, repo_id, sha, {f.path for f in files})
    return DownloadResult(folder, record, [f.path for f in todo], [f.path for f in done], time.monotonic() - started)


def _needed(repo_id: str, sha: str, files: list[RemoteFile]) -> list[RemoteFile]:
    needed = [f for f in files if wanted(f.path)]
    pickles = [f.path for f in files if f.path.endswith(PICKLE_SUFFIXES)]
    if not any(f.path.endswith((".safetensors", presharded.FILE_SUFFIX)) for f in needed):
        hint = f" (it has pickle files such as {pickles[0]}, which are never loaded)" if pickles else ""
        raise HubError(f"{repo_id}@{sha}: no safetensors weights{hint}")
    return needed


def _check_free_space(folder: Path, repo_id: str, missing_bytes: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if missing_bytes * DISK_MARGIN > free:
        raise HubError(
            f"{folder}: {repo_id} needs {missing_bytes / 1e9:.1f} GB more but only {free / 1e9:.1f} GB is free"
        )


def _raise_first(bad: list[HubError]) -> None:
    if bad:
        more = f" ({len(bad) - 1} more files also failed)" if len(bad) > 1 else ""
        raise HubError(f"{bad[0]}{more}")


def _download_to_cache(repo_id: str, revision: str | None, quiet: bool, max_workers: int) -> DownloadResult:
    from huggingface_hub import constants

    started = time.monotonic()
    check_repo_id(repo_id)
    check_revision(revision)
    if constants.HF_HUB_OFFLINE:
        snapshot = _cached_snapshot(repo_id, revision)
        _check_cached_complete(snapshot, revision)
        todo = [rel for rel in _snapshot_files(snapshot) if not _proven(snapshot, rel)]
        listed = set(_snapshot_files(snapshot))
    else:
        sha, files = remote_files(repo_id, revision)
        needed = _needed(repo_id, sha, files)
        listed = {f.path for f in files}
        snapshot = Snapshot(repo_id, sha, storage_folder(repo_id))
        by_path = {f.path: f for f in needed}
        todo = [f.path for f in needed if not (_proven(snapshot, f.path) and _blob_is(snapshot, f))]
        # Blobs are shared between commits: only bytes no revision has fetched yet need space.
        missing = sum(f.size for f in map(by_path.get, todo) if not (snapshot.blobs / _blob_name(f)).is_file())
        hub_cache().mkdir(parents=True, exist_ok=True)
        _check_free_space(hub_cache(), repo_id, missing)
        if todo:
            _fetch(repo_id, sha, todo, quiet, max_workers)
        _record_ref(snapshot, revision or "main")
        for rel in todo:
            if not _blob_is(snapshot, by_path[rel]):
                raise HubError(f"{snapshot.folder / rel}: not the file the Hub lists (expected blob "
                                   f"{_blob_name(by_path[rel])[:16]}...); rerun to fetch it again")
    _verify_blobs(snapshot, todo, quiet)
    record = DownloadRecord.for_snapshot(snapshot, revision)
    _check_shards_listed(snapshot.folder, repo_id, snapshot.commit, listed)
    done = sorted(set(_snapshot_files(snapshot)) - set(todo))
    return DownloadResult(snapshot.folder, record, todo, done, time.monotonic() - started)


def cached_snapshot_folder(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot of `repo_id@revision` when it holds the config and every shard, else None."""
    check_repo_id(repo_id)
    check_revision(revision)
    try:
        snapshot = _cached_snapshot(repo_id, revision)
        _check_cached_complete(snapshot, revision)
    except MMConvertError:
        return None
    return snapshot.folder


def download_size(repo_id: str, revision: str | None) -> str:
    """One line: what downloading `repo_id@revision` into the Hub cache needs, against what is free."""
    sha, files = remote_files(repo_id, revision)
    needed = _needed(repo_id, sha, files)
    storage = storage_folder(repo_id)
    missing = sum(f.size for f in needed if not (storage / "blobs" / _blob_name(f)).is_file())
    probe = hub_cache()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return (f"{repo_id}@{sha[:12]} is not in the Hugging Face cache ({hub_cache()}); a dry run reads headers from it. "
            f"Downloading needs {missing / 1e9:.2f} GB ({len(needed)} files), {free / 1e9:.2f} GB is free there: "
            f"run `mm-convert download {repo_id}` first")


def _record_ref(snapshot: Snapshot, revision: str) -> None:
    """Remember which commit `revision` named, as huggingface_hub does when it fetches by name (it
    does not when given the commit, which is how we fetch), so that offline runs find it."""
    if revision == snapshot.commit:
        return
    ref = confined(snapshot.storage / "refs", revision, f"{snapshot.repo_id}: revision")
    if not ref.is_file() or ref.read_text().strip() != snapshot.commit:
        atomic_write_bytes(ref, snapshot.commit.encode())


def _blob_name(f: RemoteFile) -> str:
    return f.sha256 or f.blob_id  # how huggingface_hub names blobs: the LFS oid, else the git blob sha1


def _blob_is(snapshot: Snapshot, f: RemoteFile) -> bool:
    blob = blob_of(snapshot, f.path)
    return blob is not None and blob.name == _blob_name(f) and blob.stat().st_size == f.size


def _proven(snapshot: Snapshot, rel: str, verified: VerifiedBlobs | None = None) -> bool:
    blob = blob_of(snapshot, rel)
    return blob is not None and (verified or VerifiedBlobs.load(snapshot.storage)).proven(blob)


def _snapshot_files(snapshot: Snapshot) -> list[str]:
    return sorted(p.relative_to(snapshot.folder).as_posix() for p in snapshot.folder.rglob("*")
                  if wanted(p.relative_to(snapshot.folder).as_posix()) and not p.is_dir())


def _cached_snapshot(repo_id: str, revision: str | None) -> Snapshot:
    """The cached snapshot of `revision` (a commit, or a branch or tag huggingface_hub recorded in
    `refs/`), found as huggingface_hub finds it offline."""
    from huggingface_hub import snapshot_download

    try:
        # Only the config: huggingface_hub would call the snapshot incomplete for files a conversion
        # never needs (.gitattributes, docs); what it does need is checked next, by name.
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                        allow_patterns=[output_format.CONFIG_NAME]))
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError and its kin: say it in one line
        raise HubError(
            f"{repo_id}@{revision or 'main'}: not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE=1 "
            f"forbids fetching it; run `mm-convert download {repo_id}` once online ({type(exc).__name__})") from None
    snapshot = snapshot_of(folder)
    if snapshot is None:
        raise HubError(f"{folder}: huggingface_hub returned a folder that is not a cache snapshot")
    return snapshot


def _check_cached_complete(snapshot: Snapshot, revision: str | None) -> None:
    """Offline there is no listing to compare with: the snapshot must hold the config and every
    shard its index names."""
    where = f"{snapshot.repo_id}@{revision or 'main'} ({snapshot.commit[:12]}) in {snapshot.folder}"
    needed = [output_format.CONFIG_NAME]
    if (snapshot.folder / INDEX_NAME).is_file():
        weight_map = read_json_object(snapshot.folder / INDEX_NAME).get("weight_map")
        needed += sorted({str(v) for v in weight_map.values()}) if isinstance(weight_map, dict) else []
    elif not any(snapshot.folder.glob("*.safetensors")):
        needed.append(INDEX_NAME)
    missing = [rel for rel in needed if not (snapshot.folder / rel).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HubError(f"{where}: {missing[0]}{more} not cached, and HF_HUB_OFFLINE=1 forbids fetching; "
                           "run the same command online once")


def _verify_blobs(snapshot: Snapshot, rels: list[str], quiet: bool) -> None:
    """Hash each file's blob against its name (the Hub's sha256 for LFS files, the git sha1 for the
    rest); a blob that does not match is removed, with its link, so a rerun fetches it again."""
    verified = VerifiedBlobs.load(snapshot.storage)
    blobs = [(rel, blob_of(snapshot, rel)) for rel in rels]
    bad: list[HubError] = []
    with byte_bar(sum(b.stat().st_size for _, b in blobs if b), "verify sha256", quiet) as bar:
        for rel, blob in blobs:
            if blob is None:
                bad.append(HubError(f"{snapshot.folder / rel}: not a link into {snapshot.blobs}; "
                                        "the cache entry is not huggingface_hub's"))
            elif verified.proven(blob):
                bar.update(blob.stat().st_size)
            elif content_hash_matches(blob, bar.update):
                verified.add(blob)
                verified.save()  # after each file: an interrupted verification keeps what it proved
            else:
                blob.unlink(missing_ok=True)
                (snapshot.folder / rel).unlink(missing_ok=True)
                bad.append(HubError(f"{snapshot.folder / rel}: its bytes do not hash to {blob.name[:16]}... "
                                        "(the Hub's hash); removed from the cache, rerun to fetch it again"))
    _raise_first(bad)


def _check_shards_listed(folder: Path, repo_id: str, sha: str, listed: set[str]) -> None:
    """A repo whose index names a shard it does not have is incomplete: say so now, not at convert time."""
    if INDEX_NAME not in listed:
        return
    weight_map = read_json_object(folder / INDEX_NAME).get("weight_map")
    if not isinstance(weight_map, dict):
        raise HubError(f"{folder / INDEX_NAME}: no weight_map")
    missing = sorted({str(v) for v in weight_map.values()} - listed)
    if missing:
        raise HubError(f"{repo_id}@{sha[:12]}: its {INDEX_NAME} names {missing[0]}, which the repo does not have"
                           + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))


def _partial_size(folder: Path, f: RemoteFile) -> int:
    path = folder / f.path
    return min(path.stat().st_size, f.size) if path.is_file() else 0


def _fetch(repo_id: str, sha: str, paths: list[str], quiet: bool, max_workers: int, local_dir: Path | None = None) -> None:
    from huggingface_hub import snapshot_download

    try:
        with hub_bars(quiet):
            snapshot_download(repo_id, revision=sha, local_dir=local_dir, allow_patterns=paths, max_workers=max_workers)
    except Exception as exc:  # noqa: BLE001
        raise hub_error(f"{repo_id}@{sha[:12]}: download failed (a rerun resumes)", exc) from exc


def _verify(folder: Path, f: RemoteFile, record: DownloadRecord, on_bytes) -> None:
    path = folder / f.path
    size = path.stat().st_size
    if size != f.size:
        _discard(folder, f.path)
        raise HubError(f"{path}: {size} bytes, the Hub says {f.size}; removed, rerun to fetch it again")
    digest = sha256_file(path, on_bytes) if f.sha256 else None
    if f.sha256 and digest != f.sha256:
        _discard(folder, f.path)
        raise HubError(f"{path}: sha256 {digest[:16]}... does not match the Hub's {f.sha256[:16]}...; "
                           "removed, rerun to fetch it again")
    st = path.stat()
    record.files[f.path] = {"size": size, "sha256": digest, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _discard(folder: Path, rel: str) -> None:
    (folder / rel).unlink(missing_ok=True)
    # huggingface_hub's local-dir metadata would otherwise mark the bad file as complete.
    for meta in (folder / ".cache" / "huggingface" / "download").glob(f"{rel}.*"):
        meta.unlink(missing_ok=True)


