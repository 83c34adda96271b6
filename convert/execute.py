"""Executing a conversion plan: read -> (quantise) -> profile -> write, in the plan's order.

The loop is deliberately dumb: it walks the planned files tensor by tensor and fills each planned
byte range in turn. Expert tensors are produced a chunk of experts at a time (chunks never cross an
EP rank's block), so peak memory is bounded by the chunk budget, not by the number of layers.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from convert import __version__, model, output_format
from convert.card import license_from_source, render_card
from convert.errors import ConvertError
from convert.manifest import Census, DtypeCount, Manifest, SourceIdentity, new_manifest
from convert.output_format import ConfigBlock, ShapeEntry
from convert.parallel import ParallelShape, RankGeometry
from convert.plan import ConversionPlan, PlannedFile, build_plan
from convert.profiles import Down, GateUp, Packed, get_profile
from convert.read_experts import DOWN, GATE_UP, Raw, read_raw, ready
from convert.progress import byte_bar
from convert.safetensors_file import read_header, tensor_bytes
from convert.source import SourceCheckpoint
from convert.fsutil import FileRecord
from convert.writer import StagedFile, WorkDir

COPY_CHUNK = 64 * 1024 * 1024
# Source bytes gathered per expert chunk; quantising BF16 needs about 4x this in float32 temporaries.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


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
    seconds: float


def expert_chunks(plan: ConversionPlan, chunk_bytes: int) -> list[range]:
    """Ranges of experts processed together; never crossing an EP rank's block of experts.

    Sized so a chunk's working set stays near `chunk_bytes`: FP8 bytes as stored, or for BF16
    sources the BF16 input plus the float32 quotients and the FP8 result (7 bytes per weight).
    """
    m = plan.model
    per_expert = 3 * m.hidden_size * m.intermediate_size * (1 if plan.source_kind == "fp8" else 7)
    size = max(1, min(plan.ranks[0].num_local_experts, chunk_bytes // max(1, per_expert)))
    chunks = []
    for block_start in range(0, m.num_experts, plan.ranks[0].num_local_experts):
        block_end = block_start + plan.ranks[0].num_local_experts
        chunks.extend(range(s, min(s + size, block_end)) for s in range(block_start, block_end, size))
    return chunks


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


class BufferPool:
    """Reuses large CPU buffers between chunks: no page faults or zeroing for every chunk, and the
    number in flight (so peak memory) is bounded by the pipeline's queues."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype)

    def give(self, *tensors: torch.Tensor | None) -> None:
        with self._lock:
            for t in tensors:
                if t is not None and t.device.type == "cpu":
                    self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


@dataclass
class Chunk:
    """One unit of work: a projection group of a chunk of experts of one layer, for its owner ranks."""

    layer: int
    kind: str  # "w13_weight" or "w2_weight"
    experts: range
    owners: list[RankGeometry]
    finishes: list[int]  # ranks for which this is the last chunk of (layer, kind): their scales follow
    raw: list[Raw] = field(default_factory=list)
    packed: list[tuple[int, Packed]] = field(default_factory=list)


def part_chunks(plan: ConversionPlan, part: int, ranks: list[int], chunk_bytes: int) -> list[Chunk]:
    """The work of one part group in the planned file order: per layer, gate/up chunks then down chunks."""
    geometry = [plan.ranks[r] for r in ranks]
    chunks = []
    for layer in plan.part_groups[part].layers:
        for kind in ("w13_weight", "w2_weight"):
            todo = [Chunk(layer, kind, experts, [g for g in geometry if experts.start in g.experts], [])
                    for experts in expert_chunks(plan, chunk_bytes)]
            todo = [c for c in todo if c.owners]
            for g in geometry:
                last = max(i for i, c in enumerate(todo) if g in c.owners)
                todo[last].finishes.append(g.rank)
            chunks += todo
    return chunks


class _Stage(threading.Thread):
    """A pipeline thread: takes items from `inbox`, hands results to `outbox`; stops on None or error."""

    def __init__(self, name: str, work: Callable[[Chunk], Chunk | None], inbox: queue.Queue, outbox: queue.Queue | None,
                 failed: threading.Event):
        super().__init__(name=name, daemon=True)
        self.work, self.inbox, self.outbox, self.failed = work, inbox, outbox, failed
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while (item := self.inbox.get()) is not None and not self.failed.is_set():
                result = self.work(item)
                if self.outbox is not None:
                    _put(self.outbox, result, self.failed)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
            self.failed.set()
        finally:
            if self.outbox is not None:
                _put(self.outbox, None, self.failed, always=True)


def _put(q: queue.Queue, item, failed: threading.Event, always: bool = False) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if failed.is_set() and not always:
                return
            if failed.is_set():
                try:
                    q.get_nowait()  # make room for the end marker: nobody will use the dropped item
                except queue.Empty:
                    pass


def write_part_group(
    source: SourceCheckpoint,
    plan: ConversionPlan,
    part: int,
    ranks: list[int],
    work: WorkDir,
    chunk_bytes: int,
    device: str,
    on_bytes: Callable[[int], None],
) -> list[FileRecord]:
    """Every listed rank's part file of one part group, in the planned tensor order.

    Three threads overlap the work (torch, preadv, write and sha256 all release the GIL):
    read the next chunk's source bytes | check, quantise and pack this chunk | write and hash the
    previous one. Queues of one item bound what is in flight; buffers are pooled.
    """
    files = {r: plan.expert_file(r, part) for r in ranks}
    writers = {r: work.open(f.path, f.size) for r, f in files.items()}
    pool = BufferPool()
    profile = plan.profile
    scratch: list[torch.Tensor] = []
    pending_scales: dict[int, list[torch.Tensor]] = {r: [] for r in ranks}
    next_tensor = {r: 0 for r in ranks}  # index into the planned tensors of each rank's file

    def read(chunk: Chunk) -> Chunk:
        projs = GATE_UP if chunk.kind == "w13_weight" else DOWN
        wshape = (len(chunk.experts), *plan.model.expert_weight_shapes[projs[0]])
        wdtype = torch.uint8 if plan.source_kind == "fp8" else source.info(
            model.expert_weight_name(chunk.layer, chunk.experts.start, projs[0])).torch_dtype
        for proj in projs:
            weight = pool.take(wshape, wdtype)
            scale = pool.take((len(chunk.experts), *model.scale_shape(wshape[1:])), torch.float32) \
                if plan.source_kind == "fp8" else None
            chunk.raw.append(read_raw(source, chunk.layer, chunk.experts, proj, weight, scale))
        return chunk

    def transform(chunk: Chunk) -> Chunk:
        if not scratch and plan.source_kind != "fp8":
            scratch.append(torch.empty(chunk.raw[0].weight.numel(), dtype=torch.float32, device=device))
        ready_ = [ready(source, chunk.layer, chunk.experts, r, device, scratch[0] if scratch else None) for r in chunk.raw]
        if chunk.kind == "w13_weight":
            (gate, gate_s), (up, up_s) = ready_
            batch, pack = GateUp(gate, up, gate_s, up_s), profile.pack_gate_up
        else:
            ((down, down_s),) = ready_
            batch, pack = Down(down, down_s), profile.pack_down
        shapes = profile.shapes(plan.model.hidden_size, chunk.owners[0])
        shape = (len(chunk.experts), *(shapes.w13 if chunk.kind == "w13_weight" else shapes.w2)[1:])
        for g in chunk.owners:
            out = pool.take(shape, torch.uint8) if device == "cpu" else None
            packed = pack(batch, g, out=out)
            chunk.packed.append((g.rank, Packed(packed.weight.view(torch.uint8).cpu(), packed.scale.cpu())))
        pool.give(*(t for r in chunk.raw for t in (r.weight, r.scale)))
        chunk.raw = []
        return chunk

    def write(chunk: Chunk) -> None:
        for rank, packed in chunk.packed:
            _write_planned(writers[rank], files[rank], next_tensor, rank, chunk.layer, chunk.kind, packed.weight, on_bytes)
            pending_scales[rank].append(packed.scale)
            pool.give(packed.weight)
        for rank in chunk.finishes:
            scales = torch.cat(pending_scales[rank])
            pending_scales[rank] = []
            _write_planned(writers[rank], files[rank], next_tensor, rank, chunk.layer, chunk.kind + "_scale_inv",
                           scales, on_bytes, whole=True)
        chunk.packed = []

    failed = threading.Event()
    to_transform: queue.Queue = queue.Queue(maxsize=1)
    to_write: queue.Queue = queue.Queue(maxsize=1)
    todo: queue.Queue = queue.Queue()
    for chunk in part_chunks(plan, part, ranks, chunk_bytes):
        todo.put(chunk)
    todo.put(None)
    stages = [_Stage("mm-convert-read", read, todo, to_transform, failed),
              _Stage("mm-convert-write", write, to_write, None, failed)]
    try:
        for r, f in files.items():
            header = f.header
            writers[r].write(header)
            on_bytes(len(header))
        for stage in stages:
            stage.start()
        main = _Stage("mm-convert-transform", transform, to_transform, to_write, failed)
        main.run()  # on this thread
        for stage in stages:
            stage.join()
        errors = [s.error for s in (stages[0], main, stages[1]) if s.error is not None]
        if errors:
            raise errors[0]
        return [writers[r].finish() for r in ranks]
    except BaseException:
        failed.set()
        for w in writers.values():
            w.abort()
        raise


def _write_planned(writer: StagedFile, planned: PlannedFile, next_tensor: dict[int, int], rank: int, layer: int,
                   kind: str, data: torch.Tensor, on_bytes: Callable[[int], None], whole: bool = False) -> None:
    """Append `data` to a rank's file, checking it lands inside the planned tensor it belongs to."""
    index = next_tensor[rank]
    tensor = planned.tensors[index]
    start = len(planned.header) + tensor.offset
    end = start + tensor.nbytes
    if (tensor.layer, tensor.kind) != (layer, kind) or not start <= writer.written < end:
        raise RuntimeError(f"{planned.path}: wrote {kind} of layer {layer} where the plan has {tensor.name}")
    view = tensor_bytes(data.contiguous())
    writer.write(view)
    on_bytes(len(view))
    if writer.written > end or (whole and writer.written != end):
        raise RuntimeError(f"{planned.path}: {tensor.name} overran its planned bytes")
    if writer.written == end:
        next_tensor[rank] = index + 1


# -- the whole conversion ------------------------------------------------------------------------


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
            records, written, reused = _write_all(source, plan, work, options, previous)
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
    return ConvertResult(out, plan, tuple(records.values()), written, reused, time.monotonic() - started)


def _write_all(source: SourceCheckpoint, plan: ConversionPlan, work: WorkDir, options: ConvertOptions,
               previous: Manifest | None) -> tuple[dict[str, FileRecord], int, int]:
    records: dict[str, FileRecord] = {}
    written = reused = 0
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
        for group in plan.part_groups:
            todo = [g.rank for g in plan.ranks if not done(plan.expert_file(g.rank, group.part))]
            if todo:
                for rec in write_part_group(source, plan, group.part, todo, work, options.chunk_bytes,
                                            options.device, count):
                    records[rec.path] = rec

    index = {
        "metadata": {"total_size": sum(f.data_size for f in plan.shards)},
        "weight_map": {t.name: f.path for f in plan.shards for t in f.tensors},
    }
    records[output_format.INDEX_NAME] = _small_file(
        work, output_format.INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    )
    for name in plan.auxiliary_files:
        records[name] = _small_file(work, name, (source.root / name).read_bytes())
    return records, written, reused
