"""One conversion end to end: plan, work area, files, manifest, commit.

`convert` opens the source, builds the plan of the requested output format (refusing an
impossible request before anything is written), takes the output folder's lock, checks the
fingerprint, then fills the planned files, then the config, auxiliary files and model card. Files
already done (staged by an interrupted run, or kept from an earlier conversion into the same
folder) are re-hashed and kept. Everything is renamed into place at the end and the manifest is
written last.

- `experts`: pass-through shards by copying bytes (plus their index), each rank's expert parts
  through the rank-tensor stream (convert/transform.py) into `FileSink`s.
- `presharded`: a short pass hashes the non-expert tensors (about 2% of the bytes), so equal
  contents are known before the layout is fixed; then one pass of the stream into `FileSink`s
  writes each file once, by the rank that produces it, taking every tensor's content key as it
  streams (the key names it in the file and in `checksum.json`); `checksum.json` follows, and
  `READY` is renamed into place last.
"""

from __future__ import annotations

import logging
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mm_convert import __version__, model, output_format
from mm_convert.write.card import card_files, source_card_metadata
from mm_convert.errors import MMConvertError, OutputError, RequestError
from mm_convert.plan.estimate import Estimate, check_disk, estimate
from mm_convert.fsutil import FileRecord, atomic_write_bytes, confined, read_small_file
from mm_convert.write.manifest import Census, DtypeCount, Manifest, RecipeRecord, SourceIdentity, new_manifest
from mm_convert.output_format import ConfigBlock, ShapeEntry
from mm_convert.plan.parallel import ParallelShape
from mm_convert.plan import presharded, sglang_state
from mm_convert.plan.build import (
    ConversionPlan,
    PlannedFile,
    PreshardedLayout,
    PreshardedPlan,
    build_plan,
    build_presharded_plan,
    lay_out_presharded,
)
from mm_convert.transform.profiles import get_profile, sglang_state_profile
from mm_convert.recipe import ConvertSpec
from mm_convert.units import human_bytes
from mm_convert.progress import byte_bar
from mm_convert.read.safetensors_file import read_header
from mm_convert.read.digests import DigestCollector
from mm_convert.write.sinks import FileSink, HashSink
from mm_convert.plan.sglang_state import DEFAULT_GPU_ARCH, PreshardedTarget
from mm_convert.read.source import SourceCheckpoint
from mm_convert.transform.stream import RankStream, expert_stream, run_stream
from mm_convert.write.workarea import WorkDir

COPY_CHUNK = 64 * 1024 * 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertOptions:
    profile: str = ConvertSpec.profile
    tp: int = ConvertSpec.tp
    ep: int = ConvertSpec.ep
    part_size: int = ConvertSpec.part_size
    device: str = ConvertSpec.device
    overwrite: bool = False
    quiet: bool = False
    chunk_bytes: int = ConvertSpec.chunk_size
    source_repo: str | None = None
    source_revision: str | None = None
    source_sha256: dict[str, str] = field(default_factory=dict)
    recipe_name: str | None = None
    # torch intra-op threads for the transforms; None: `default_torch_threads()`
    torch_threads: int | None = None
    format: str | None = ConvertSpec.format  # None: `output_format.default_format(profile)`
    gpu_arch: str = ConvertSpec.gpu_arch  # presharded: the GPU whose post-processed state is written
    ranks: tuple[int, ...] | None = None  # presharded: write only these ranks' files (None: all)

    @property
    def output_format(self) -> str:
        return self.format or output_format.default_format(self.profile)

    @classmethod
    def from_spec(cls, spec: "ConvertSpec", **rest: Any) -> "ConvertOptions":
        """A recipe's [convert] table (with command-line overrides applied) plus run settings."""
        return cls(profile=spec.profile, tp=spec.tp, ep=spec.ep, part_size=spec.part_size, device=spec.device,
                   format=spec.format, gpu_arch=spec.gpu_arch, ranks=spec.ranks, chunk_bytes=spec.chunk_size, **rest)

    def recipe_record(self) -> RecipeRecord:
        if self.output_format == "presharded":
            return RecipeRecord(self.recipe_name, self.output_format, self.profile, self.tp, self.ep,
                                gpu_arch=self.gpu_arch, ranks=self.ranks)
        return RecipeRecord(self.recipe_name, self.output_format, self.profile, self.tp, self.ep,
                            part_size=self.part_size)

    def check(self) -> None:
        """Refuse a combination that cannot be written, in one line, before the source is read."""
        fmt = self.output_format
        if fmt not in output_format.OUTPUT_FORMATS:
            raise RequestError(f"--format {fmt!r}: choose one of {', '.join(output_format.OUTPUT_FORMATS)}")
        if fmt == "presharded" and not get_profile(self.profile).is_sglang_state:
            raise RequestError(f"--format presharded holds SGLang's own state, which is the sglang profile; "
                               f"profile {self.profile!r} needs --format experts")
        if fmt == "experts" and self.ranks is not None:
            raise RequestError("--ranks applies to --format presharded (the experts format writes every rank)")
        if fmt == "experts" and self.gpu_arch != DEFAULT_GPU_ARCH:
            raise RequestError("--gpu-arch applies to --format presharded (the experts format is the same on every GPU)")
        PreshardedTarget(ParallelShape(self.tp, self.ep), self.gpu_arch).check()


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    plan: ConversionPlan | PreshardedPlan
    records: tuple[FileRecord, ...]
    bytes_written: int
    files_reused: int
    data_files_written: int  # shards and expert parts written by this run (0: everything was already there)
    seconds: float
    shape: ShapeEntry | None = None  # the shape this conversion wrote, as recorded
    launch_command: str | None = None  # presharded: how SGLang serves it

    def as_dict(self) -> dict[str, Any]:
        """For `convert --json`: what was written, and how to serve it."""
        return {"out": str(self.out), "label": self.label, "shape": asdict(self.shape) if self.shape else None,
                "files": [asdict(r) for r in self.records], "bytes_written": self.bytes_written,
                "files_reused": self.files_reused, "data_files_written": self.data_files_written,
                "seconds": round(self.seconds, 3), "launch_command": self.launch_command}

    @property
    def label(self) -> str:
        p = self.plan
        if isinstance(p, PreshardedPlan):
            ranks = "" if len(p.ranks) == p.parallel.tp else f", ranks {','.join(map(str, p.ranks))}"
            return f"presharded {p.parallel.label} for {p.target.gpu_arch}{ranks}"
        return f"experts, profile {p.profile.name}, {p.parallel.label}"


# -- writing -------------------------------------------------------------------------------------


def copy_shard(source: SourceCheckpoint, planned: PlannedFile, work: WorkDir, on_bytes: Callable[[int], None],
               digests: DigestCollector | None = None) -> FileRecord:
    """A non-expert shard: the planned header, then each source tensor's bytes unchanged."""
    writer = work.open(planned.path, planned.size)
    header = planned.header
    writer.write(header)
    on_bytes(len(header))
    buffer = torch.empty(COPY_CHUNK, dtype=torch.uint8)
    for t in planned.tensors:
        assert t.source is not None and writer.written == len(header) + t.offset
        _stream_tensor(source, t.source, buffer, digests, writer.write, on_bytes)
    return writer.finish()


def _stream_tensor(source: SourceCheckpoint, name: str, buffer: torch.Tensor, digests: DigestCollector | None,
                   write: Callable[[memoryview], None] | None = None, on_bytes: Callable[[int], None] = lambda n: None
                   ) -> None:
    """A source tensor's bytes, in pieces: written (if `write`) and digested (if `digests`)."""
    total, seen = source.info(name).nbytes, 0
    for chunk in source.read_chunks(name, buffer):
        seen += len(chunk)
        if write is not None:
            write(chunk)
        if digests is not None:
            digests.add_tensor(name, chunk, last=seen == total)
        on_bytes(len(chunk))
    if total == 0 and digests is not None:
        digests.add_tensor(name, b"", last=True)


# -- the whole conversion ------------------------------------------------------------------------


def default_torch_threads(cores: int | None = None) -> int:
    """Half the usable cores, at least one.

    The pipeline already keeps a reader, the transform and one writer per rank (hashing and
    writing) busy at once; torch's OpenMP workers on top of them over-subscribe the cores. Measured
    on 2 cores (docs/PERF.md): a real-size BF16 layer to sglang TP4 took 9.4 s with 1 torch thread
    against 10.9 s with torch's default of 2; FP8 sources, which need no arithmetic, were the same.
    """
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // 2)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's thread count is process-wide: set it for the conversion, then give the caller's back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fingerprint(source: SourceCheckpoint, options: ConvertOptions) -> dict[str, Any]:
    return {
        "tool_version": __version__,
        "format_version": output_format.FORMAT_VERSION,
        "source_files": [[f.name, f.size, f.mtime_ns, f.inode, f.header_sha256] for f in source.files],
        "source_repo": options.source_repo,
        "source_revision": options.source_revision,
        **json.loads(json.dumps(asdict(options.recipe_record()))),  # as stored: lists, not tuples
        "name": None,
    }


def _check_out_folder(out: Path, source: SourceCheckpoint) -> None:
    resolved = out.resolve()
    if resolved == source.root:
        raise OutputError(f"{out}: the output folder is the source folder; a source is never modified")
    if source.root in resolved.parents:
        raise OutputError(f"{out}: inside the source folder {source.root}; a source is never modified, choose another")
    if resolved in source.root.parents:
        raise OutputError(f"{out}: holds the source folder {source.root}; choose an output folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir():
        ours = {output_format.MANIFEST_NAME, output_format.WORK_DIR}
        entries = {p.name for p in out.iterdir()}
        if entries and not entries & ours:
            raise OutputError(f"{out}: not empty and holds no mm-convert output; choose an empty or new folder")


def _previous(out: Path, identity: SourceIdentity, profile: str, fmt: str, overwrite: bool
              ) -> tuple[Manifest | None, Manifest | None]:
    """(a finished conversion in `out` this one extends, one it replaces with --overwrite).

    Nothing is removed here: a replaced conversion stays whole until the new one is complete (the
    swap happens at commit), so a refused or failed run loses nothing."""
    if not (out / output_format.MANIFEST_NAME).exists():
        return None, None
    previous = Manifest.load(out)
    previous_format = previous.recipe.format
    reason = None
    if not previous.source.same_weights(identity):
        reason = "a different source (or the same files changed since)"
    elif previous.profile != profile:
        reason = f"profile {previous.profile!r} (one profile per output folder)"
    elif previous_format != fmt:
        reason = f"format {previous_format!r} (one output format per folder)"
    if reason is None:
        return previous, None
    if not overwrite:
        raise OutputError(f"{out}: already holds a conversion of {reason}; pass --overwrite to replace it")
    return None, previous


REPLACED_FILE = "replaced.json"  # in the work area: a replaced conversion's files still to remove


def _swap_out(out: Path, work: WorkDir, replaced: Manifest | None, new_paths: set[str]) -> list[str]:
    """Before the commit: drop the replaced conversion's manifest (no stale folder may look complete),
    noting its files in the work area so a rerun after a crash finishes the removal."""
    note = work.root / REPLACED_FILE
    stale = sorted({r.path for r in replaced.files} - new_paths) if replaced else []
    if note.exists():
        stale = sorted(set(stale) | {p for p in json.loads(note.read_bytes()) if isinstance(p, str)} - new_paths)
    if replaced is not None:
        atomic_write_bytes(note, json.dumps(stale).encode())
        (out / output_format.MANIFEST_NAME).unlink(missing_ok=True)
    return stale


def _remove_stale(out: Path, stale: list[str], where: str) -> None:
    """Remove files of a replaced conversion (each proven inside OUT first), and folders left empty."""
    for rel in stale:
        path = confined(out, rel, where)
        path.unlink(missing_ok=True)
        for parent in path.parents:
            if parent == out or out not in parent.parents:
                break
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break


def serving_config(source: SourceCheckpoint) -> dict[str, Any]:
    """The output's config.json without the mm_convert block: what a serving engine reads."""
    config = dict(source.config)
    if source.kind != "fp8":
        # BF16 sources: only the routed experts become FP8; everything else stays as it was.
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": model.FP8_DTYPE_NAME,
            "activation_scheme": "dynamic",
            "weight_block_size": [model.QUANT_BLOCK, model.QUANT_BLOCK],
            "modules_to_not_convert": ["self_attn", *model.MODULES_NOT_CONVERTED],
        }
    return config


def _config_json(source: SourceCheckpoint, profile: str, fmt: str, shapes: list[ShapeEntry]) -> dict[str, Any]:
    config = serving_config(source)
    flags = get_profile(profile).flags
    block = ConfigBlock(
        format_version=output_format.FORMAT_VERSION,
        profile=profile,
        use_shuffled_weight=flags.use_shuffled_weight,
        weight_layout=flags.weight_layout,
        source_kind=source.kind,
        shapes=tuple(shapes),
        tool_version=__version__,
        format=fmt,
    )
    config[output_format.CONFIG_BLOCK_KEY] = block.to_dict()
    return config


def shape_entry(plan: ConversionPlan) -> ShapeEntry:
    return ShapeEntry.of(plan.parallel, plan.model, parts_per_rank=len(plan.part_groups),
                         dir=output_format.shape_dir(plan.parallel))


def presharded_shape_entry(plan: PreshardedPlan, data_files: int) -> ShapeEntry:
    every_rank = len(plan.ranks) == plan.parallel.tp
    return ShapeEntry.of(plan.parallel, plan.model, parts_per_rank=0, dir=plan.folder, format="presharded",
                         gpu_arch=plan.target.gpu_arch, sglang_version=sglang_state.SGLANG_VERSION,
                         ranks=None if every_rank else plan.ranks, data_files=data_files)


def census(out_paths: dict[str, Path], source: SourceCheckpoint, fmt: str = "experts") -> Census:
    """Tensors and bytes on both sides; the sums must close (no source tensor silently dropped)."""
    by_dtype: dict[str, list[int]] = {}
    expert = other = 0
    for path in out_paths.values():
        if path.suffix not in (".safetensors", presharded.FILE_SUFFIX):
            continue
        for info in read_header(path).tensors:
            counts = by_dtype.setdefault(info.dtype, [0, 0])
            counts[0] += 1
            counts[1] += info.nbytes
            if output_format.parse_expert_tensor_name(info.name):
                expert += 1
            else:
                other += 1
    src_expert = sum(1 for n in source.tensors if model.parse_expert_name(n))
    not_loaded = sum(1 for n in source.tensors if sglang_state.not_loaded_by_sglang(n, source.config)) \
        if fmt == "presharded" else 0
    result = Census(
        source_expert_tensors=src_expert,
        source_other_tensors=len(source.tensors) - src_expert,
        output_expert_tensors=expert,
        output_other_tensors=other,
        output_by_dtype={k: DtypeCount(*v) for k, v in sorted(by_dtype.items())},
        source_not_loaded=not_loaded,
    )
    if fmt == "experts" and other != result.source_other_tensors:
        raise MMConvertError(f"census: the source has {result.source_other_tensors} non-expert tensors but the output "
                           f"shards hold {other}; refusing to record an incomplete conversion")
    return result


def _small_file(work: WorkDir, rel: str, data: bytes) -> FileRecord:
    writer = work.open(rel, len(data))
    writer.write(data)
    return writer.finish()


def _json_bytes(obj: Any, sort_keys: bool = False) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode()


@dataclass
class _Written:
    """What the data step of a conversion did."""

    records: dict[str, FileRecord] = field(default_factory=dict)
    bytes_written: int = 0
    reused: int = 0
    data_files_written: int = 0
    last: tuple[str, ...] = ()  # paths renamed into place after every other file (presharded READY)


class _Progress:
    """The byte bar plus the reuse check every format shares."""

    def __init__(self, work: WorkDir, previous: Manifest | None, written: _Written, bar) -> None:
        self.work, self.previous, self.written, self.bar = work, previous, written, bar

    def done(self, f: PlannedFile) -> bool:
        """A planned file already complete (staged by an interrupted run, or kept from an earlier conversion)."""
        known = self.previous.record(f.path) if self.previous else None
        rec = self.work.verified(f.path, f.size, known, on_bytes=self.bar.update)
        if rec is None:
            return False
        self.written.records[f.path] = rec
        self.written.reused += 1
        return True

    def count(self, n: int) -> None:
        self.written.bytes_written += n
        self.bar.update(n)


def convert(source_dir: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions) -> ConvertResult:
    """Convert a MiniMax-M2 checkpoint folder into `out` (see README "Output format")."""
    started = time.monotonic()
    out = Path(out)
    options.check()
    fmt = options.output_format
    with SourceCheckpoint.open(source_dir) as source:
        plan = _plan(source, options)
        if options.device != "cpu" and not torch.cuda.is_available():
            raise RequestError(f"--device {options.device}: no CUDA device is available here")
        identity = SourceIdentity.of(source, options.source_repo, options.source_revision, options.source_sha256,
                                     source_card_metadata(source.root))
        _check_out_folder(out, source)
        est = estimate(plan, out, options.overwrite)
        log.info("plan: %s, %d tensor files, %s (%s still to write, %s free at %s)", est.label, len(est.files),
                 human_bytes(est.total_bytes), human_bytes(est.needed_bytes), human_bytes(est.free_bytes), out)
        check_disk(est, out)
        work = WorkDir(out)
        work.acquire()  # first: a refused run must not have touched a finished conversion
        try:
            previous, replaced = _previous(out, identity, options.profile, fmt, options.overwrite)
            log.info("previous output in %s: %s", out, "none" if previous is None else
                     f"{len(previous.files)} files kept if they re-hash" + (" (replaced at commit: --overwrite)" if replaced else ""))
            if isinstance(plan, PreshardedPlan) and previous is not None:
                plan = _with_previous_ranks(plan, previous)
            work.check_fingerprint(_fingerprint(source, options), options.overwrite)
            threads = options.torch_threads or default_torch_threads()
            digests = _digest_collector(source, work, previous)
            with _torch_threads(threads):
                if isinstance(plan, ConversionPlan):
                    written = _write_experts(source, plan, work, options, previous, digests)
                    new_shape = shape_entry(plan)
                else:
                    written, lay = _write_presharded(source, plan, work, options, previous, digests)
                    new_shape = presharded_shape_entry(plan, len(lay.needed))
                source_digests = _finish_digests(source, digests)
                if isinstance(plan, PreshardedPlan):
                    for name in _not_recoverable(source, plan):
                        source_digests.pop(name, None)
            for name in plan.auxiliary_files:
                written.records[name] = _small_file(work, name, (source.root / name).read_bytes())
            records = written.records
            shapes = [s for s in (previous.shapes if previous else []) if s.dir != new_shape.dir] + [new_shape]
            config = _config_json(source, options.profile, fmt, shapes)
            records[output_format.CONFIG_NAME] = _small_file(work, output_format.CONFIG_NAME, _json_bytes(config))
            kept = [r for r in (previous.files if previous else []) if r.path not in records
                    and r.path not in (output_format.MODEL_CARD_NAME, output_format.CHART_NAME) and not r.path.startswith(new_shape.dir + "/")]
            all_records = list(records.values()) + kept
            paths = {r.path: (work.staged_path(r.path) if work.staged_path(r.path).exists() else out / r.path)
                     for r in all_records}
            # A shape whose files were (re)written must be validated again; one merely verified keeps its result.
            validation = {k: v for k, v in (previous.validation if previous else {}).items()
                          if k != new_shape.key or not written.data_files_written}
            manifest = new_manifest(identity, options.profile, options.recipe_record(),
                                    shapes, all_records, census(paths, source, fmt), validation,
                                    source_digests)
            card = card_files(config, manifest)
            for name, data in card.items():
                records[name] = _small_file(work, name, data)
            manifest.files = [r for r in manifest.files if r.path not in card] + [records[name] for name in card]
            replaced_files = _swap_out(out, work, replaced, set(records) | {r.path for r in kept})
            work.commit(sorted(p for p in records if p not in written.last) + list(written.last))
            _remove_stale(out, replaced_files, f"{work.root / REPLACED_FILE}: entry")
            stale = [r.path for r in (previous.files if previous else [])
                     if r.path.startswith(new_shape.dir + "/") and r.path not in records]
            _remove_stale(out, stale, f"{out / output_format.MANIFEST_NAME}: files entry")
            manifest.save(out)  # last: its presence means the folder is complete
            work.remove()
        finally:
            work.release()
    launch = None
    if isinstance(plan, PreshardedPlan):
        launch = presharded.launch_command(str(out.resolve()), plan.parallel.tp, plan.parallel.ep, plan.root,
                                           sglang_state.MOE_RUNNER_BACKEND)
    return ConvertResult(out, plan, tuple(records.values()), written.bytes_written, written.reused,
                         written.data_files_written, time.monotonic() - started, new_shape, launch)


def _plan(source: SourceCheckpoint, options: ConvertOptions) -> ConversionPlan | PreshardedPlan:
    parallel = ParallelShape(options.tp, options.ep)
    if options.output_format == "experts":
        return build_plan(source, get_profile(options.profile), parallel, options.part_size)
    return build_presharded_plan(source, PreshardedTarget(parallel, options.gpu_arch), options.ranks)  # type: ignore[arg-type]


def dry_run(source_dir: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions) -> Estimate:
    """What `convert` would write into `out`, per rank and in all, and whether it fits; reads only
    the source's headers and writes nothing."""
    options.check()
    with SourceCheckpoint.open(source_dir) as source:
        plan = _plan(source, options)
        _check_out_folder(Path(out), source)
        return estimate(plan, Path(out), options.overwrite)


DIGESTS_FILE = "digests.json"  # in the work area: source digests completed so far, for a rerun


def _digest_collector(source: SourceCheckpoint, work: WorkDir, previous: Manifest | None) -> DigestCollector:
    """Digests already known (an earlier conversion of these same files, or this one's interrupted run)
    plus the ones this run completes, each saved as it completes."""
    known = dict(previous.source_digests) if previous else {}
    try:
        saved = json.loads(read_small_file(work.root / DIGESTS_FILE))
        if isinstance(saved, dict):
            known.update({str(k): str(v) for k, v in saved.items()})
    except (MMConvertError, ValueError):
        pass

    def save(done: dict[str, str]) -> None:
        atomic_write_bytes(work.root / DIGESTS_FILE, json.dumps(done).encode())

    return DigestCollector(source.shape.num_experts, done=known, on_done=save)


def _not_recoverable(source: SourceCheckpoint, plan: PreshardedPlan) -> set[str]:
    """Source tensors whose bytes a presharded folder does not hold as such (cast to the model's dtype,
    or re-quantised for SM100): their digests cannot be checked from the folder, so none is kept."""
    out = set()
    for state in plan.states:
        for t in state:
            if isinstance(t.recipe, sglang_state.Ue8m0Requant):
                out.update(sglang_state.sources_of(t.recipe))
            elif isinstance(t.recipe, sglang_state.Assemble):
                out.update(n for n in sglang_state.sources_of(t.recipe) if source.dtype_of(n) != t.dtype)
    return out


def _finish_digests(source: SourceCheckpoint, digests: DigestCollector) -> dict[str, str]:
    """Every source tensor's digest: non-expert tensors not yet digested are read (about 2% of the bytes)."""
    buffer = torch.empty(COPY_CHUNK, dtype=torch.uint8)
    for name in source.non_expert_names():
        if name not in digests.done:
            _stream_tensor(source, name, buffer, digests)
    return digests.done


def _write_experts(source: SourceCheckpoint, plan: ConversionPlan, work: WorkDir, options: ConvertOptions,
                   previous: Manifest | None, digests: DigestCollector | None = None) -> _Written:
    written = _Written()
    with byte_bar(plan.total_bytes, f"convert {plan.profile.name} {plan.parallel.label}", options.quiet) as bar:
        progress = _Progress(work, previous, written, bar)
        for shard in plan.shards:
            if not progress.done(shard):
                written.records[shard.path] = copy_shard(source, shard, work, progress.count, digests)
                written.data_files_written += 1
        todo: dict[int, list[PlannedFile]] = {}
        for f in plan.expert_files:
            if not progress.done(f):
                todo.setdefault(f.rank, []).append(f)  # type: ignore[arg-type]
        sinks = {r: FileSink(work, files, progress.count) for r, files in todo.items()}
        streams = [RankStream(plan.ranks[r], expert_stream(plan.model, plan.profile, plan.ranks[r]), sink)
                   for r, sink in sinks.items()]
        run_stream(source, plan.profile, streams, options.chunk_bytes, options.device, digests=digests)
        for sink in sinks.values():
            for rec in sink.records:
                written.records[rec.path] = rec
            written.data_files_written += len(sink.records)
    index = {
        "metadata": {"total_size": sum(f.data_size for f in plan.shards)},
        "weight_map": {t.name: f.path for f in plan.shards for t in f.tensors},
    }
    written.records[output_format.INDEX_NAME] = _small_file(work, output_format.INDEX_NAME, _json_bytes(index, sort_keys=True))
    return written


# -- presharded ------------------------------------------------------------------------------------


def _with_previous_ranks(plan: PreshardedPlan, previous: Manifest) -> PreshardedPlan:
    """Converting more ranks of a folder that holds some keeps those: the folder covers both."""
    for s in previous.shapes:
        if s.dir == plan.folder:
            earlier = s.ranks
            ranks = set(range(plan.parallel.tp)) if earlier is None else set(earlier)
            return replace(plan, ranks=tuple(sorted(ranks | set(plan.ranks))))
    return plan


def _previous_keys(out: Path, lay: PreshardedLayout) -> dict[str, list[str]]:
    """The content keys of files an earlier, finished conversion left in this folder (its checksum.json)."""
    path = out / lay.plan.folder / presharded.CHECKSUM_NAME
    try:
        plan = json.loads(path.read_text())
        reads = {(int(r), e["name"]): e["stored_key"] for r, items in plan["rank_to_reads"].items() for e in items}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    keys = {}
    for f, lf in zip(lay.files, lay.layout):
        row = [reads.get(t.producer) for t in lf.tensors]
        if all(isinstance(k, str) for k in row):
            keys[f.path] = row
    return keys


SMALL_KEYS_FILE = "small_keys.json"  # in the work area: the non-expert content keys, for a rerun


def small_tensor_keys(source: SourceCheckpoint, plan: PreshardedPlan, chunk_bytes: int,
                      on_bytes: Callable[[int], None] = lambda n: None) -> list[dict[str, str]]:
    """The content key of every non-expert tensor of every rank; equal recipes are made and hashed once."""
    first: dict[tuple, tuple[int, str]] = {}
    wanted: list[list] = [[] for _ in plan.states]
    for r, state in enumerate(plan.states):
        for t in state:
            if isinstance(t.recipe, sglang_state.ExpertTensor):
                continue
            identity = sglang_state.recipe_identity(t)
            if identity not in first:
                first[identity] = (r, t.name)
                wanted[r].append(t)
    sinks = [HashSink(ts, on_bytes) for ts in wanted]
    streams = [RankStream(g, state, sink) for g, state, sink in zip(plan.geometry, plan.states, sinks) if sink.tensors]
    run_stream(source, sglang_state_profile(), streams, chunk_bytes)
    keys: list[dict[str, str]] = []
    for state in plan.states:
        row = {}
        for t in state:
            if not isinstance(t.recipe, sglang_state.ExpertTensor):
                owner, name = first[sglang_state.recipe_identity(t)]
                row[t.name] = sinks[owner].keys[name]
        keys.append(row)
    return keys


def _small_keys(source: SourceCheckpoint, plan: PreshardedPlan, work: WorkDir, options: ConvertOptions):
    path = work.root / SMALL_KEYS_FILE
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, list) and len(cached) == len(plan.states) and all(
                isinstance(row, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in row.items())
                for row in cached):
            return cached
    except (OSError, ValueError):
        pass
    small = sum(t.nbytes for state in plan.states for t in state if not isinstance(t.recipe, sglang_state.ExpertTensor))
    with byte_bar(small, "hash non-expert tensors", options.quiet) as bar:
        keys = small_tensor_keys(source, plan, options.chunk_bytes, bar.update)
    atomic_write_bytes(path, json.dumps(keys).encode())
    return keys


def _write_presharded(source: SourceCheckpoint, plan: PreshardedPlan, work: WorkDir, options: ConvertOptions,
                      previous: Manifest | None, digests: DigestCollector | None = None
                      ) -> tuple[_Written, PreshardedLayout]:
    """One pass of the stream: each needed file written once, by the rank that produces it, with its
    tensors' content keys taken as they stream; files a `--ranks` subset does not write are only hashed."""
    lay = lay_out_presharded(plan, _small_keys(source, plan, work, options))
    written = _Written()
    keys: dict[str, list[str]] = {}
    earlier = _previous_keys(work.out, lay) if previous else {}
    needed = {f.path for f in lay.needed}
    with byte_bar(lay.total_bytes, f"convert presharded {plan.parallel.label} {plan.target.gpu_arch}", options.quiet) as bar:
        progress = _Progress(work, previous, written, bar)
        write: dict[int, list[PlannedFile]] = {}
        hash_only: dict[int, list[PlannedFile]] = {}
        for f in lay.files:
            if f.path in needed and progress.done(f):
                known = work.journal_keys(f.path) or earlier.get(f.path)
                if known is not None and len(known) == len(f.tensors):
                    keys[f.path] = known
                    continue
                written.records.pop(f.path)  # kept bytes but unknown keys: write it again
                written.reused -= 1
            (write if f.path in needed else hash_only).setdefault(f.rank, []).append(f)  # type: ignore[arg-type]
        sinks = {r: FileSink(work, write.get(r, []), progress.count, hash_only.get(r, []))
                 for r in sorted(set(write) | set(hash_only))}
        streams = [RankStream(plan.geometry[r], plan.states[r], sink) for r, sink in sinks.items()]
        run_stream(source, sglang_state_profile(), streams, options.chunk_bytes, options.device, digests=digests)
        for sink in sinks.values():
            for rec in sink.records:
                written.records[rec.path] = rec
            written.data_files_written += len(sink.records)
            keys.update(sink.keys)
    checksum_plan = presharded.checksum_json(lay.layout, [keys[f.path] for f in lay.files], plan.parallel.tp,
                                             plan.shard_config)
    checksum = f"{plan.folder}/{presharded.CHECKSUM_NAME}"
    ready = f"{plan.folder}/{presharded.READY_NAME}"
    written.records[checksum] = _small_file(work, checksum, _json_bytes(checksum_plan))
    written.records[ready] = _small_file(work, ready, _json_bytes(presharded.ready_json(plan.parallel.tp, f"mm-convert {__version__}")))
    written.last = (ready,)
    return written, lay
