"""Publish a converted checkpoint: bounded commits (`preupload_lfs_files` + `create_commit`, which
validates README.md's metadata with the endpoint itself), the card, config, manifest and presharded
READY/checksum.json in the last one, files the Hub already has skipped, one progress bar.

Without Xet on the server set `HF_HUB_DISABLE_XET=1` (read at import time).
"""
from __future__ import annotations
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from mm_convert import output_format
from mm_convert.errors import HubError, MMConvertError
from mm_convert.fsutil import confined
from mm_convert.write.manifest import Manifest
from mm_convert.progress import byte_bar
from mm_convert.recipe import PublishSpec
from mm_convert.hub_client import (
    hub_api,
    bounded_timeouts,
    hub_bars,
    hub_error,
    is_final,
    check_repo_id,
    check_revision,
)



@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    revision: str
    commits: list[str]
    uploaded: list[str]
    unchanged: list[str]
    uploaded_bytes: int
    seconds: float


def _git_blob_sha1(path: Path) -> str:
    import hashlib

    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _inside(out: Path, rel: str) -> Path:
    path = confined(out, rel, f"{out / output_format.MANIFEST_NAME}: files entry")
    if path.is_symlink():
        raise HubError(f"{path}: a symbolic link; only files inside OUT are published")
    return path


def _batches(paths: list[tuple[str, int]], limit: int) -> Iterator[list[tuple[str, int]]]:
    batch: list[tuple[str, int]] = []
    size = 0
    for rel, n in paths:
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append((rel, n))
        size += n
    if batch:
        yield batch


@bounded_timeouts()
def publish(out: str | Path, repo_id: str, private: bool = PublishSpec.private, revision: str = PublishSpec.revision,
            batch_bytes: int = PublishSpec.batch_size, quiet: bool = False, allow_failed_validation: bool = False
            ) -> PublishResult:
    """Upload a finished conversion in bounded commits, the card/config/manifest last; idempotent.

    The folder is only read: the card was written by `convert` (and refreshed by `validate --record`),
    so what is published is byte for byte what is on disk, and every file's sha256 is checked against
    the manifest on the way."""
    from huggingface_hub import CommitOperationAdd

    started = time.monotonic()
    out = Path(out)
    check_repo_id(repo_id)
    check_revision(revision)
    manifest = Manifest.load(out)
    failed = [k for k, v in manifest.validation.items() if not v.passed]
    if failed and not allow_failed_validation:
        raise HubError(f"{out}: validation failed for {', '.join(failed)}; fix it or pass --allow-failed-validation")
    if not (out / output_format.MODEL_CARD_NAME).is_file():
        raise HubError(f"{out / output_format.MODEL_CARD_NAME}: missing; the folder is not a finished conversion")
    api = hub_api()

    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = {e.path: e for e in api.list_repo_tree(repo_id, revision=revision, recursive=True)
                  if hasattr(e, "size")}
    except Exception as exc:  # noqa: BLE001
        raise hub_error(f"publish to {repo_id}", exc) from exc

    records = {f.path: f for f in manifest.files}
    todo: list[tuple[str, int]] = []
    unchanged: list[str] = []
    for rel in sorted(records) + [output_format.MANIFEST_NAME]:
        path = _inside(out, rel)
        size = path.stat().st_size
        r = remote.get(rel)
        same = False
        if r is not None and r.size == size:
            lfs = getattr(r, "lfs", None)
            if lfs is not None and rel in records:
                same = lfs.sha256 == records[rel].sha256
            else:
                same = r.blob_id == _git_blob_sha1(path)
        if same:
            unchanged.append(rel)
        else:
            todo.append((rel, size))
    bulk = [t for t in todo if not is_final(t[0])]
    final = [t for t in todo if is_final(t[0])]

    commits: list[str] = []
    uploaded_bytes = 0
    groups = list(_batches(bulk, batch_bytes)) + ([final] if final else [])
    with byte_bar(sum(n for _, n in todo), f"publish {repo_id}", quiet) as bar:
        for i, group in enumerate(groups, 1):
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(_inside(out, rel))) for rel, _ in group]
            last_commit = group is final
            message = ("mm-convert: model card, config, manifest and presharded READY (publish complete)" if last_commit else
                       f"mm-convert: upload part {i} of {len(groups) - (1 if final else 0)} ({len(group)} files)")
            try:
                # One file at a time, so the one bar moves per file; huggingface_hub's own per-file
                # bars stay off (hundreds of them at real scale).
                with hub_bars(quiet=True):
                    for op, (_, n) in zip(ops, group):
                        api.preupload_lfs_files(repo_id, additions=[op], revision=revision)
                        rec = records.get(op.path_in_repo)
                        if rec is not None and op.upload_info.sha256.hex() != rec.sha256:
                            raise HubError(f"{out / op.path_in_repo}: changed since conversion (sha256 differs "
                                               f"from {output_format.MANIFEST_NAME}); validate or reconvert before "
                                               "publishing")
                        bar.update(n)
                    info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=revision)
            except MMConvertError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise hub_error(f"publish to {repo_id}: commit {i} of {len(groups)} failed (files so far are kept "
                                 "on the Hub; a rerun uploads only what is missing)", exc) from exc
            commits.append(info.oid)
            uploaded_bytes += sum(n for _, n in group)
    return PublishResult(repo_id, revision, commits, [rel for rel, _ in todo], unchanged, uploaded_bytes,
                         time.monotonic() - started)

