"""One conversion end to end: plan, work area, files, manifest, commit.

`convert` opens the source, builds the plan (refusing an impossible request before anything is
written), takes the output folder's lock, checks the fingerprint, then fills the planned files:
pass-through shards by copying bytes, expert parts through `transform.write_part_group`, then the
config, index, auxiliary files and model card. Files already done (staged by an interrupted run, or
kept from an earlier conversion into the same folder) are re-hashed and kept. Everything is renamed
into place at the end and the manifest is written last.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from convert import __version__, model, output_format
from convert.card import license_from_source, render_card
from convert.errors import ConvertError
from convert.fsutil import FileRecord
from convert.manifest import Census, DtypeCount, Manifest, SourceIdentity, new_manifest
from convert.output_format import ConfigBlock, ShapeEntry
from convert.parallel import ParallelShape
from convert.plan import ConversionPlan, PlannedFile, build_plan
from convert.profiles import get_profile
from convert.progress import byte_bar
from convert.safetensors_file import read_header
from convert.source import SourceCheckpoint
from convert.transform import DEFAULT_CHUNK_BYTES, write_part_group
from convert.writer import WorkDir

COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class ConvertOptions:
    profile: str = "sglang"
    tp: int = 1
    ep: int = 1
    part_size: int = output_format.DEFAULT_PART_SIZE
    device: str = "cpu"
    overwrite: bool = False
    quiet: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    source_repo: str | None = None
    source_revision: str | None = None
    source_sha256: dict[str, str] = field(default_factory=dict)
    recipe_name: str | None = None
    # torch intra-op threads for the transforms; None: `default_torch_threads()`
    torch_threads: int | None = None

    def recipe_record(self) -> dict[str, Any]:
        return {
            "name": self.recipe_name,
            "profile": self.profile,
            "tp": self.tp,
            "ep": self.ep,
            "part_size": self.part_size,
        }


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    plan: ConversionPlan
    records: tuple[FileRecord, ...]
    bytes_written: int
    files_reused: int
    data_files_written: int  # shards and expert parts written by this run (0: everything was already there)
    seconds: float


# -- writing -------------------------------------------------------------------------------------


def copy_shard(source: SourceCheckpoint, planned: PlannedFile, work: WorkDir, on_bytes: Callable[[int], None]) -> FileRecord:
    """A non-expert shard: the planned header, then each source tensor's bytes unchanged."""
    writer = work.open(planned.path, planned.size)
    header = planned.header
    writer.write(header)
    on_bytes(len(header))
    buffer = torch.empty(COPY_CHUNK, dtype=torch.uint8)
    for t in planned.tensors:
        assert t.source is not None and writer.written == len(header) + t.offset
        for chunk in source.read_chunks(t.source, buffer):
            writer.write(chunk)
            on_bytes(len(chunk))
    return writer.finish()


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
        "source_files": [[f.name, f.size, f.mtime_ns, f.header_sha256] for f in source.files],
        "source_repo": options.source_repo,
        "source_revision": options.source_revision,
        "profile": options.profile,
        "tp": options.tp,
        "ep": options.ep,
        "part_size": options.part_size,
    }


def _check_out_folder(out: Path, source: SourceCheckpoint) -> None:
    if out.resolve() == source.root:
        raise ConvertError(f"{out}: the output folder is the source folder; a source is never modified")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder")
    if out.is_dir():
        ours = {output_format.MANIFEST_NAME, output_format.WORK_DIR}
        entries = {p.name for p in out.iterdir()}
        if entries and not entries & ours:
            raise ConvertError(f"{out}: not empty and holds no mm-convert output; choose an empty or new folder")


def _previous(out: Path, identity: SourceIdentity, plan: ConversionPlan, overwrite: bool) -> Manifest | None:
    """A finished conversion already in `out` that this one may extend with another parallel shape."""
    if not (out / output_format.MANIFEST_NAME).exists():
        return None
    previous = Manifest.load(out)
    reason = None
    if not previous.source.same_weights(identity):
        reason = "a different source"
    elif previous.profile != plan.profile.name:
        reason = f"profile {previous.profile!r} (one profile per output folder)"
    if reason is None:
        return previous
    if not overwrite:
        raise ConvertError(f"{out}: already holds a conversion of {reason}; pass --overwrite to replace it")
    _remove_previous(out, previous)
    return None


def _remove_previous(out: Path, previous: Manifest) -> None:
    for rec in previous.files:
        (out / rec.path).unlink(missing_ok=True)
    (out / output_format.MANIFEST_NAME).unlink(missing_ok=True)


def _config_json(source: SourceCheckpoint, plan: ConversionPlan, shapes: list[ShapeEntry]) -> dict[str, Any]:
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
    block = ConfigBlock(
        format_version=output_format.FORMAT_VERSION,
        profile=plan.profile.name,
        use_shuffled_weight=plan.profile.flags.use_shuffled_weight,
        weight_layout=plan.profile.flags.weight_layout,
        source_kind=plan.source_kind,
        shapes=tuple(shapes),
        tool_version=__version__,
    )
    config[output_format.CONFIG_BLOCK_KEY] = block.to_dict()
    return config


def shape_entry(plan: ConversionPlan) -> ShapeEntry:
    return ShapeEntry(
        tp=plan.parallel.tp,
        ep=plan.parallel.ep,
        moe_tp=plan.parallel.moe_tp,
        padded_intermediate_size=plan.padded_intermediate_size,
        experts_per_rank=plan.ranks[0].num_local_experts,
        parts_per_rank=len(plan.part_groups),
        dir=output_format.shape_dir(plan.parallel),
    )


def census(out_paths: dict[str, Path], source: SourceCheckpoint) -> Census:
    by_dtype: dict[str, list[int]] = {}
    expert = other = 0
    for path in out_paths.values():
        if path.suffix != ".safetensors":
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
    return Census(
        source_expert_tensors=src_expert,
        source_other_tensors=len(source.tensors) - src_expert,
        output_expert_tensors=expert,
        output_other_tensors=other,
        output_by_dtype={k: DtypeCount(*v) for k, v in sorted(by_dtype.items())},
    )


def _small_file(work: WorkDir, rel: str, data: bytes) -> FileRecord:
    writer = work.open(rel, len(data))
    writer.write(data)
    return writer.finish()


def convert(source_dir: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions) -> ConvertResult:
    """Convert a MiniMax-M2 checkpoint folder into `out` (see README "Output format")."""
    started = time.monotonic()
    out = Path(out)
    with SourceCheckpoint.open(source_dir) as source:
        plan = build_plan(source, get_profile(options.profile), ParallelShape(options.tp, options.ep), options.part_size)
        if options.device != "cpu" and not torch.cuda.is_available():
            raise ConvertError(f"--device {options.device}: no CUDA device is available here")
        identity = SourceIdentity.of(source, options.source_repo, options.source_revision, options.source_sha256)
        _check_out_folder(out, source)
        previous = _previous(out, identity, plan, options.overwrite)
        work = WorkDir(out)
        work.acquire()
        try:
            work.check_fingerprint(_fingerprint(source, options), options.overwrite)
            threads = options.torch_threads or default_torch_threads()
            with _torch_threads(threads):
                records, written, reused, data_written = _write_all(source, plan, work, options, previous)
            new_shape = shape_entry(plan)
            shapes = [ShapeEntry(**s) for s in (previous.shapes if previous else [])
                      if (s["tp"], s["ep"]) != (plan.parallel.tp, plan.parallel.ep)] + [new_shape]
            config = _config_json(source, plan, shapes)
            records[output_format.CONFIG_NAME] = _small_file(
                work, output_format.CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode()
            )
            kept = [r for r in (previous.files if previous else []) if r.path not in records
                    and r.path != output_format.MODEL_CARD_NAME and not r.path.startswith(new_shape.dir + "/")]
            all_records = list(records.values()) + kept
            paths = {r.path: (work.staged_path(r.path) if work.staged_path(r.path).exists() else out / r.path)
                     for r in all_records}
            validation = {k: v for k, v in (previous.validation if previous else {}).items() if k != new_shape.dir}
            manifest = new_manifest(identity, plan.profile.name, options.recipe_record(),
                                    [asdict(s) for s in shapes], all_records, census(paths, source), validation)
            card_text = render_card(config, manifest, license_from_source(source.root))
            records[output_format.MODEL_CARD_NAME] = _small_file(work, output_format.MODEL_CARD_NAME, card_text.encode())
            manifest.files = [r for r in manifest.files if r.path != output_format.MODEL_CARD_NAME] + \
                [records[output_format.MODEL_CARD_NAME]]
            work.commit(sorted(records))
            stale = previous.files if previous else []
            for rec in stale:
                if rec.path.startswith(new_shape.dir + "/") and rec.path not in records:
                    (out / rec.path).unlink(missing_ok=True)
            manifest.save(out)  # last: its presence means the folder is complete
            work.remove()
        finally:
            work.release()
    return ConvertResult(out, plan, tuple(records.values()), written, reused, data_written,
                         time.monotonic() - started)


def _write_all(source: SourceCheckpoint, plan: ConversionPlan, work: WorkDir, options: ConvertOptions,
               previous: Manifest | None) -> tuple[dict[str, FileRecord], int, int, int]:
    records: dict[str, FileRecord] = {}
    written = reused = data_written = 0
    with byte_bar(plan.total_bytes, f"convert {plan.profile.name} {plan.parallel.label}", options.quiet) as bar:

        def done(f: PlannedFile) -> bool:
            nonlocal reused
            known = previous.record(f.path) if previous else None
            rec = work.verified(f.path, f.size, known, on_bytes=bar.update)
            if rec is None:
                return False
            records[f.path] = rec
            reused += 1
            return True

        def count(n: int) -> None:
            nonlocal written
            written += n
            bar.update(n)

        for shard in plan.shards:
            if not done(shard):
                records[shard.path] = copy_shard(source, shard, work, count)
                data_written += 1
        for group in plan.part_groups:
            todo = [g.rank for g in plan.ranks if not done(plan.expert_file(g.rank, group.part))]
            if todo:
                for rec in write_part_group(source, plan, group.part, todo, work, options.chunk_bytes,
                                            options.device, count):
                    records[rec.path] = rec
                data_written += len(todo)

    index = {
        "metadata": {"total_size": sum(f.data_size for f in plan.shards)},
        "weight_map": {t.name: f.path for f in plan.shards for t in f.tensors},
    }
    records[output_format.INDEX_NAME] = _small_file(
        work, output_format.INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    )
    for name in plan.auxiliary_files:
        records[name] = _small_file(work, name, (source.root / name).read_bytes())
    return records, written, reused, data_written
