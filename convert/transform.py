"""The expert transform loop: planned chunks of experts -> bytes in each rank's part file.

The loop itself is dumb: the plan fixes every tensor's offset, `part_chunks` lists the work in file
order, and each rank's writer appends what it is given, checking that it lands inside the planned
tensor. To keep the disk busy on a two-core machine the work runs as a pipeline of threads
(torch ops, preadv, write and sha256 all release the GIL):

    reader:     source bytes of the next chunk, into pooled buffers
    transform:  (this thread) value checks, BF16 quantisation, the profile's pack per owner rank
    writer x R: one per rank file: write and hash its share of each chunk, then its scales

Queues hold at most a chunk or two per stage, so peak memory is a few chunks, whatever the number
of layers. For the `sglang` profile's gate/up weights the writers stream straight from the source
buffers (`sglang_gate_up_segments`): no packed copy is made at all.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from convert import model
from convert.fsutil import FileRecord
from convert.parallel import RankGeometry
from convert.plan import ConversionPlan, PlannedFile
from convert.profiles import Down, GateUp, sglang_gate_up_scale, sglang_gate_up_segments
from convert.read_experts import DOWN, GATE_UP, Raw, read_raw, ready
from convert.safetensors_file import tensor_bytes
from convert.source import SourceCheckpoint
from convert.writer import StagedFile, WorkDir

# Source bytes gathered per chunk of experts (FP8 as stored; BF16 counts its quantisation temporaries).
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


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


class BufferPool:
    """Reuses large CPU buffers between chunks: no page faults or zeroing for every chunk, and the
    number in flight (so peak memory) is bounded by the pipeline's queues. With a GPU doing the
    transform the buffers are pinned, so host-device copies run at full speed."""

    def __init__(self, pinned: bool = False) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.pinned = pinned

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=self.pinned)

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
    buffers: list[torch.Tensor] = field(default_factory=list)  # back to the pool once every owner wrote
    pending: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def written_by_one_owner(self, pool: BufferPool) -> None:
        with self.lock:
            self.pending -= 1
            done = self.pending == 0
        if done:
            pool.give(*self.buffers)
            self.buffers = []


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


@dataclass
class RankShare:
    """What one rank writes of a chunk: weight bytes (in pieces, file order) and the chunk's scales."""

    chunk: Chunk
    pieces: list[torch.Tensor]
    scale: torch.Tensor


class _Failure:
    """The first error of any thread; every stage checks it and stops."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def set(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.event.set()


def _put(q: queue.Queue, item, failure: _Failure) -> bool:
    """Block until there is room, unless the pipeline failed (then drop the item)."""
    while not failure.event.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, failure: _Failure):
    while not failure.event.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


class _RankWriter(threading.Thread):
    """Appends one rank's shares to its staged file, in order, and writes its scales when due."""

    def __init__(self, rank: int, writer: StagedFile, planned: PlannedFile, pool: BufferPool, failure: _Failure,
                 on_bytes: Callable[[int], None]):
        super().__init__(name=f"mm-convert-write-rank{rank}", daemon=True)
        self.rank, self.writer, self.planned, self.pool, self.failure = rank, writer, planned, pool, failure
        self.on_bytes = on_bytes
        self.inbox: queue.Queue = queue.Queue(maxsize=2)
        self.next_tensor = 0
        self.scales: list[torch.Tensor] = []

    def run(self) -> None:
        try:
            while (share := _get(self.inbox, self.failure)) is not None:
                chunk = share.chunk
                for piece in share.pieces:
                    self._append(chunk.layer, chunk.kind, piece)
                self.scales.append(share.scale)
                share.pieces = []
                chunk.written_by_one_owner(self.pool)
                if self.rank in chunk.finishes:
                    self._append(chunk.layer, chunk.kind + "_scale_inv", torch.cat(self.scales), whole=True)
                    self.scales = []
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.failure.set(exc)

    def _append(self, layer: int, kind: str, data: torch.Tensor, whole: bool = False) -> None:
        """Write `data` at the end of the file, checking it lands inside the planned tensor it belongs to."""
        tensor = self.planned.tensors[self.next_tensor]
        start = len(self.planned.header) + tensor.offset
        end = start + tensor.nbytes
        written = self.writer.written
        if (tensor.layer, tensor.kind) != (layer, kind) or not start <= written < end:
            raise RuntimeError(f"{self.planned.path}: wrote {kind} of layer {layer} where the plan has {tensor.name}")
        view = tensor_bytes(data.contiguous())
        self.writer.write(view)
        self.on_bytes(len(view))
        if self.writer.written > end or (whole and self.writer.written != end):
            raise RuntimeError(f"{self.planned.path}: {tensor.name} overran its planned bytes")
        if self.writer.written == end:
            self.next_tensor += 1


def write_part_group(source: SourceCheckpoint, plan: ConversionPlan, part: int, ranks: list[int], work: WorkDir,
                     chunk_bytes: int, device: str, on_bytes: Callable[[int], None]) -> list[FileRecord]:
    """Every listed rank's part file of one part group, in the planned tensor order."""
    files = {r: plan.expert_file(r, part) for r in ranks}
    writers = {r: work.open(f.path, f.size) for r, f in files.items()}
    pool = BufferPool(pinned=device != "cpu")
    failure = _Failure()
    profile = plan.profile
    stream_gate_up = profile.name == "sglang" and device == "cpu"
    scratch: torch.Tensor | None = None
    zeros = torch.zeros(plan.padded_intermediate_size * plan.model.hidden_size, dtype=torch.uint8)
    rank_writers = {r: _RankWriter(r, writers[r], files[r], pool, failure, on_bytes) for r in ranks}

    def read_all(chunks: list[Chunk], out: queue.Queue) -> None:
        try:
            for chunk in chunks:
                projs = GATE_UP if chunk.kind == "w13_weight" else DOWN
                wshape = (len(chunk.experts), *plan.model.expert_weight_shapes[projs[0]])
                wdtype = torch.uint8 if plan.source_kind == "fp8" else source.info(
                    model.expert_weight_name(chunk.layer, chunk.experts.start, projs[0])).torch_dtype
                for proj in projs:
                    weight = pool.take(wshape, wdtype)
                    scale = pool.take((len(chunk.experts), *model.scale_shape(wshape[1:])), torch.float32) \
                        if plan.source_kind == "fp8" else None
                    chunk.raw.append(read_raw(source, chunk.layer, chunk.experts, proj, weight, scale))
                    chunk.buffers += [t for t in (weight, scale) if t is not None]
                if not _put(out, chunk, failure):
                    return
            _put(out, None, failure)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failure.set(exc)

    def pooled(chunk: Chunk, g: RankGeometry) -> torch.Tensor:
        """A reusable host buffer for one rank's packed weight."""
        shapes = profile.shapes(plan.model.hidden_size, g)
        shape = (len(chunk.experts), *(shapes.w13 if chunk.kind == "w13_weight" else shapes.w2)[1:])
        buffer = pool.take(shape, torch.uint8)
        chunk.buffers.append(buffer)
        return buffer

    def quantised_buffer(chunk: Chunk, raw: Raw) -> torch.Tensor | None:
        """A reusable FP8 buffer for a BF16 projection's quantised weights (host transforms only)."""
        if raw.scale is not None or device != "cpu":
            return None
        buffer = pool.take(tuple(raw.weight.shape), torch.uint8)
        chunk.buffers.append(buffer)
        return buffer

    def packed_on_host(chunk: Chunk, g: RankGeometry, pack, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack on the transform device; a GPU result is copied into a pinned pooled host buffer."""
        host = pooled(chunk, g)
        if device == "cpu":
            packed = pack(batch, g, out=host)
        else:
            packed = pack(batch, g)
            host.copy_(packed.weight.view(torch.uint8))
        return host, packed.scale.cpu()

    def transform(chunk: Chunk) -> None:
        nonlocal scratch
        if scratch is None and plan.source_kind != "fp8":
            scratch = torch.empty(chunk.raw[0].weight.numel(), dtype=torch.float32, device=device)
        values = [ready(source, chunk.layer, chunk.experts, r, device, scratch, quantised_buffer(chunk, r))
                  for r in chunk.raw]
        chunk.raw = []
        shares = []
        for g in chunk.owners:
            if chunk.kind == "w13_weight":
                (gate, gate_s), (up, up_s) = values
                batch = GateUp(gate, up, gate_s, up_s)
                if stream_gate_up:  # write straight from the source buffers: no packed copy
                    share = RankShare(chunk, sglang_gate_up_segments(batch, g, zeros), sglang_gate_up_scale(batch, g))
                else:
                    weight, scale = packed_on_host(chunk, g, profile.pack_gate_up, batch)
                    share = RankShare(chunk, [weight], scale)
            else:
                ((down, down_s),) = values
                weight, scale = packed_on_host(chunk, g, profile.pack_down, Down(down, down_s))
                share = RankShare(chunk, [weight], scale)
            shares.append(share)
        chunk.pending = len(shares)
        for share, g in zip(shares, chunk.owners):
            if not _put(rank_writers[g.rank].inbox, share, failure):
                return

    to_transform: queue.Queue = queue.Queue(maxsize=1)
    chunks = part_chunks(plan, part, ranks, chunk_bytes)
    reader = threading.Thread(target=read_all, args=(chunks, to_transform), name="mm-convert-read", daemon=True)
    try:
        for r, f in files.items():
            header = f.header
            writers[r].write(header)
            on_bytes(len(header))
        for w in rank_writers.values():
            w.start()
        reader.start()
        while (chunk := _get(to_transform, failure)) is not None:
            transform(chunk)
        for w in rank_writers.values():
            _put(w.inbox, None, failure)
        reader.join()
        for w in rank_writers.values():
            w.join()
        if failure.error is not None:
            raise failure.error
        return [writers[r].finish() for r in ranks]
    except BaseException as exc:
        failure.set(exc)
        reader.join(timeout=10)
        for w in rank_writers.values():
            w.join(timeout=10)
        for w in writers.values():
            w.abort()
        raise

