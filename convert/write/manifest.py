"""`mm_convert.json`: what was converted from what, every output file's size and sha256, a census.

The manifest holds no timestamps and no host names, so an interrupted-and-resumed conversion
produces exactly the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mm_convert import __version__
from mm_convert.errors import CheckFailed, MMConvertError
from mm_convert.fsutil import FileRecord, atomic_write_bytes, confined, read_json_object
from mm_convert.output_format import FORMAT_VERSION, MANIFEST_NAME, ShapeEntry
from mm_convert.read.source import SourceCheckpoint

TOOL_NAME = "mm-convert"


@dataclass(frozen=True)
class SourceFileEntry:
    name: str
    size: int
    header_sha256: str
    sha256: str | None = None  # the Hub's LFS oid, when the file as read is the one verified on download
    mtime_ns: int | None = None  # with the inode: a file rewritten in place since is a different source
    inode: int | None = None


@dataclass(frozen=True)
class SourceIdentity:
    """Where the weights came from. `path` is the source folder's name (no local path is published);
    identity is repo/revision and the files."""

    repo_id: str | None
    revision: str | None
    path: str
    kind: str  # "fp8" or "bf16"
    files: tuple[SourceFileEntry, ...]
    # the source's own model-card metadata the output's card carries over (licence, language, tags)
    card: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, source: SourceCheckpoint, repo_id: str | None = None, revision: str | None = None,
           file_sha256: dict[str, str] | None = None, card: dict[str, Any] | None = None) -> "SourceIdentity":
        hashes = file_sha256 or {}
        return cls(
            card=dict(card or {}),
            repo_id=repo_id,
            revision=revision,
            path=source.root.name,
            kind=source.kind,
            files=tuple(SourceFileEntry(f.name, f.size, f.header_sha256, hashes.get(f.name), f.mtime_ns, f.inode)
                        for f in source.files),
        )

    def same_weights(self, other: "SourceIdentity") -> bool:
        """Provably the same bytes: equal names and sizes, and either the same verified sha256 or the
        same header, modification time and inode (a file rewritten in place changes its mtime)."""
        if len(self.files) != len(other.files):
            return False
        for a, b in zip(self.files, other.files):
            if (a.name, a.size) != (b.name, b.size):
                return False
            if a.sha256 and b.sha256:
                if a.sha256 != b.sha256:
                    return False
            elif (a.header_sha256, a.mtime_ns, a.inode) != (b.header_sha256, b.mtime_ns, b.inode) or a.mtime_ns is None:
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
    source_not_loaded: int = 0  # presharded: source tensors SGLang skips on purpose (MTP layers, inv_freq)


@dataclass(frozen=True)
class RecipeRecord:
    """What the conversion was asked for, as recorded (the manifest's `recipe`)."""

    name: str | None
    format: str
    profile: str
    tp: int
    ep: int
    gpu_arch: str | None = None  # presharded
    ranks: tuple[int, ...] | None = None  # presharded: the ranks asked for (None: all)
    part_size: int | None = None  # experts

    def __post_init__(self) -> None:
        if self.ranks is not None:
            object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))


@dataclass(frozen=True)
class ValidationSummary:
    """One shape's recorded validation (`validate --record`, `run`): what the card's table shows and
    `run` compares before skipping a validation."""

    passed: bool
    incomplete: bool = False
    tool_version: str = ""
    source_checked: bool = False
    kernel: str | None = None
    kernel_note: str = ""
    layers: list[int] = field(default_factory=list)
    tokens: int = 0
    allow_skip: bool = False
    not_run: list[str] = field(default_factory=list)
    checks: dict[str, dict[str, int]] = field(default_factory=dict)  # check -> {"pass": n, "fail": n}
    quant_error: dict[str, Any] | None = None  # BF16 sources: mean/max/limit/tensors and per_layer rows
    kernel_rows: list[dict[str, Any]] = field(default_factory=list)  # shape, layer, status and the metrics
    settings: dict[str, Any] = field(default_factory=dict)  # kernel_requested, tokens, seed, allow_skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ValidationSummary":
        if not isinstance(d, dict) or not isinstance(d.get("passed"), bool):
            raise ValueError("a validation entry without a boolean 'passed'")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def line(self) -> str:
        verdict = "passed" if self.passed else "INCOMPLETE" if self.incomplete else "FAILED"
        counts = ", ".join(f"{c} {v.get('pass', 0)} pass / {v.get('fail', 0)} fail" for c, v in sorted(self.checks.items()))
        return (f"{verdict} ({counts}; {'against the source' if self.source_checked else 'without the source'}; "
                f"kernel {self.kernel}, layers {self.layers})")


@dataclass
class Manifest:
    tool: str
    tool_version: str
    format_version: int
    source: SourceIdentity
    profile: str
    recipe: RecipeRecord
    shapes: list[ShapeEntry]
    files: list[FileRecord]
    census: Census
    validation: dict[str, ValidationSummary] = field(default_factory=dict)  # shape key (or "all") -> summary
    # convert/digests.py: what was read, so validate can undo the layout and compare without the source
    source_digests: dict[str, str] = field(default_factory=dict)
    digest_algorithm: str = "xxh3_128"

    def to_json(self) -> bytes:
        d = asdict(self)
        d["files"] = sorted(d["files"], key=lambda f: f["path"])
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def load(cls, out: Path) -> "Manifest":
        path = out / MANIFEST_NAME
        try:
            d = read_json_object(path)
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
                    card=dict(src.get("card") or {}),
                ),
                profile=d["profile"],
                recipe=RecipeRecord(**d["recipe"]),
                shapes=[ShapeEntry(**s) for s in d["shapes"]],
                files=[FileRecord(_listed(out, path, f["path"]), int(f["size"]), str(f["sha256"])) for f in d["files"]],
                census=Census(
                    source_expert_tensors=census["source_expert_tensors"],
                    source_other_tensors=census["source_other_tensors"],
                    output_expert_tensors=census["output_expert_tensors"],
                    output_other_tensors=census["output_other_tensors"],
                    output_by_dtype={k: DtypeCount(**v) for k, v in census["output_by_dtype"].items()},
                    source_not_loaded=int(census.get("source_not_loaded", 0)),
                ),
                validation={str(k): ValidationSummary.from_dict(v) for k, v in (d.get("validation") or {}).items()},
                source_digests={str(k): str(v) for k, v in (d.get("source_digests") or {}).items()},
                digest_algorithm=str(d.get("digest_algorithm", "xxh3_128")),
            )
        except MMConvertError as exc:
            if not path.exists() and not path.is_symlink():
                raise CheckFailed(f"{path}: missing: the folder holds no finished conversion") from None
            raise exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckFailed(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    def save(self, out: Path) -> None:
        atomic_write_bytes(out / MANIFEST_NAME, self.to_json())

    def record(self, rel_path: str) -> FileRecord | None:
        for f in self.files:
            if f.path == rel_path:
                return f
        return None


def _listed(out: Path, manifest: Path, rel: object) -> str:
    """A file path the manifest lists, proven inside the output folder before anything opens or removes it."""
    confined(out, rel, f"{manifest}: files entry")
    return str(rel)


def new_manifest(source: SourceIdentity, profile: str, recipe: RecipeRecord, shapes: list[ShapeEntry],
                 files: list[FileRecord], census: Census, validation: dict[str, ValidationSummary] | None = None,
                 source_digests: dict[str, str] | None = None) -> Manifest:
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
        source_digests=dict(sorted((source_digests or {}).items())),
    )
