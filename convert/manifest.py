"""`mm_convert.json`: what was converted from what, every output file's size and sha256, a census.

The manifest holds no timestamps and no host names, so an interrupted-and-resumed conversion
produces exactly the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert import __version__
from convert.errors import ConvertError
from convert.fsutil import FileRecord, atomic_write_bytes
from convert.output_format import FORMAT_VERSION, MANIFEST_NAME
from convert.source import SourceCheckpoint

TOOL_NAME = "mm-convert"


@dataclass(frozen=True)
class SourceFileEntry:
    name: str
    size: int
    header_sha256: str
    sha256: str | None = None  # known when the file came from the Hub (its LFS oid, verified on download)


@dataclass(frozen=True)
class SourceIdentity:
    """Where the weights came from. `path` is informational; identity is repo/revision and the files."""

    repo_id: str | None
    revision: str | None
    path: str
    kind: str  # "fp8" or "bf16"
    files: tuple[SourceFileEntry, ...]

    @classmethod
    def of(cls, source: SourceCheckpoint, repo_id: str | None = None, revision: str | None = None,
           file_sha256: dict[str, str] | None = None) -> "SourceIdentity":
        hashes = file_sha256 or {}
        return cls(
            repo_id=repo_id,
            revision=revision,
            path=str(source.root),
            kind=source.kind,
            files=tuple(SourceFileEntry(f.name, f.size, f.header_sha256, hashes.get(f.name)) for f in source.files),
        )

    def same_weights(self, other: "SourceIdentity") -> bool:
        """Same tensors: equal shard names, sizes and headers (and sha256 where both know it)."""
        if len(self.files) != len(other.files):
            return False
        for a, b in zip(self.files, other.files):
            if (a.name, a.size, a.header_sha256) != (b.name, b.size, b.header_sha256):
                return False
            if a.sha256 and b.sha256 and a.sha256 != b.sha256:
                return False
        return True


@dataclass(frozen=True)
class DtypeCount:
    tensors: int
    bytes: int


@dataclass(frozen=True)
class Census:
    """How many tensors and bytes, by dtype, on each side of the conversion."""

    source_expert_tensors: int
    source_other_tensors: int
    output_expert_tensors: int
    output_other_tensors: int
    output_by_dtype: dict[str, DtypeCount]


@dataclass
class Manifest:
    tool: str
    tool_version: str
    format_version: int
    source: SourceIdentity
    profile: str
    recipe: dict[str, Any]
    shapes: list[dict[str, Any]]
    files: list[FileRecord]
    census: Census
    validation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["files"] = sorted(d["files"], key=lambda f: f["path"])
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def load(cls, out: Path) -> "Manifest":
        path = out / MANIFEST_NAME
        try:
            d = json.loads(path.read_text())
            src = d["source"]
            census = d["census"]
            return cls(
                tool=d["tool"],
                tool_version=d["tool_version"],
                format_version=int(d["format_version"]),
                source=SourceIdentity(
                    repo_id=src.get("repo_id"),
                    revision=src.get("revision"),
                    path=src["path"],
                    kind=src["kind"],
                    files=tuple(SourceFileEntry(**f) for f in src["files"]),
                ),
                profile=d["profile"],
                recipe=d.get("recipe", {}),
                shapes=list(d["shapes"]),
                files=[FileRecord(f["path"], int(f["size"]), f["sha256"]) for f in d["files"]],
                census=Census(
                    source_expert_tensors=census["source_expert_tensors"],
                    source_other_tensors=census["source_other_tensors"],
                    output_expert_tensors=census["output_expert_tensors"],
                    output_other_tensors=census["output_other_tensors"],
                    output_by_dtype={k: DtypeCount(**v) for k, v in census["output_by_dtype"].items()},
                ),
                validation=d.get("validation") or {},
            )
        except FileNotFoundError:
            raise ConvertError(f"{path}: missing: the folder holds no finished conversion") from None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConvertError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    def save(self, out: Path) -> None:
        atomic_write_bytes(out / MANIFEST_NAME, self.to_json())

    def record(self, rel_path: str) -> FileRecord | None:
        for f in self.files:
            if f.path == rel_path:
                return f
        return None


def new_manifest(source: SourceIdentity, profile: str, recipe: dict[str, Any], shapes: list[dict[str, Any]],
                 files: list[FileRecord], census: Census, validation: dict[str, Any] | None = None) -> Manifest:
    return Manifest(
        tool=TOOL_NAME,
        tool_version=__version__,
        format_version=FORMAT_VERSION,
        source=source,
        profile=profile,
        recipe=recipe,
        shapes=shapes,
        files=files,
        census=census,
        validation=validation or {},
    )
