"""The rank-tensor stream: every rank's tensors, in stream order, handed to one sink per rank.

Both output formats are this one stream with different sinks (convert/sinks.py): the `experts`
format's part files, the `presharded` format's content-keyed files, and the hashing pass that
computes presharded content keys before anything is written. A rank's stream is its list of
`RankTensor`s (convert/sglang_state.py): expert tensors are packed by the layout profile from
chunks of source experts shared by all ranks; other tensors are produced from their recipes
(convert/rank_tensors.py). A sink says which tensors it wants; nothing else is read or made.

The loop is dumb, but runs as a pipeline of threads so the disk stays busy on two cores (torch
ops, preadv, write, sha256 and xxh3 all release the GIL):

    reader:     the next item's source bytes: a chunk of experts into pooled buffers, or a piece
                of a non-expert tensor
    transform:  (this thread) value checks, BF16 quantisation, the profile's pack per owner rank
    writer x R: one per rank: hands the rank's pieces to its sink, in order, then its scales

Queues hold a chunk or two per stage, so peak memory is a few chunks whatever the number of
layers. For the `sglang` profile's gate/up weights the writers stream straight from the source
buffers (`sglang_gate_up_segments`): no packed copy is made at all.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mm_convert import model, output_format
from mm_convert.plan.parallel import RankGeometry
from mm_convert.transform.profiles import Down, GateUp, Profile, sglang_down_scale, sglang_gate_up_scale, sglang_gate_up_segments
from mm_convert.read.digests import DigestCollector
from mm_convert.transform.rank_tensors import RequantCache, produce
from mm_convert.read.read_experts import DOWN, GATE_UP, Raw, read_raw, ready
from mm_convert.plan.sglang_state import ExpertTensor, RankTensor
from mm_convert.read.source import SourceCheckpoint



class Sink(Protocol):
    """Where one rank's stream goes. `write` gets contiguous CPU pieces of each wanted tensor, in
    stream order; `close` is called once the stream ended without error."""

    def wants(self, name: str) -> bool: ...

    def write(self, name: str, data: torch.Tensor) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class RankStream:
    """One rank's tensors in stream order, and the sink that takes the ones it wants."""

    geometry: RankGeometry
    tensors: tuple[RankTensor, ...]
    sink: Sink


def expert_stream(model_shape: model.ModelShape, profile: Profile, g: RankGeometry) -> tuple[RankTensor, ...]:
    """The expert tensors of a rank in a layout profile, layer by layer, in `EXPERT_TENSOR_KINDS` order."""
    s = profile.shapes(model_shape.hidden_size, g)
    shapes = {"w13_weight": s.w13, "w13_weight_scale_inv": s.w13_scale, "w2_weight": s.w2, "w2_weight_scale_inv": s.w2_scale}
    return tuple(
        RankTensor(output_format.expert_tensor_name(layer, kind), output_format.EXPERT_DTYPES[kind], tuple(shapes[kind]),
                   ExpertTensor(layer, kind))
        for layer in range(model_shape.num_layers) for kind in output_format.EXPERT_TENSOR_KINDS
    )


def expert_chunks(m: model.ModelShape, experts_per_rank: int, source_kind: str, chunk_bytes: int) -> list[range]:
    """Ranges of experts processed together; never crossing an EP rank's block of experts.

    Sized so a chunk's working set stays near `chunk_bytes`: FP8 bytes as stored, or for BF16
    sources the BF16 input plus the float32 quotients and the FP8 result (7 bytes per weight).
    """
    per_expert = 3 * m.hidden_size * m.intermediate_size * (1 if source_kind == "fp8" else 7)
    size = max(1, min(experts_per_rank, chunk_bytes // max(1, per_expert)))
    chunks = []
    for block_start in range(0, m.num_experts, experts_per_rank):
        block_end = block_start + experts_per_rank
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

    def lease(self) -> "Lease":
        """Buffers that go back together once every holder is done with them."""
        return Lease(self)


class Lease:
    """The buffers of one chunk, shared by the threads that read, transform and write it: the one
    object that owns them and gives them back to the pool when the last holder releases them."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool, self._tensors, self._holders = pool, [], 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self._pool.take(shape, dtype)
        self._tensors.append(t)
        return t

    def hold(self, holders: int) -> None:
        """`holders` releases will come (one per owner rank); none: back to the pool now."""
        with self._lock:
            self._holders = holders
        if holders == 0:
            self._give_back()

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._give_back()

    def _give_back(self) -> None:
        tensors, self._tensors = self._tensors, []
        self._pool.give(*tensors)


# -- the work items ------------------------------------------------------------------------------


@dataclass
class Chunk:
    """A projection group (gate/up or down) of a chunk of experts of one layer, for its owner ranks."""

    layer: int
    kind: str  # "w13_weight" or "w2_weight"
    experts: range
    owners: list[RankGeometry]
    finishes: list[int]  # ranks for which this is the last chunk of (layer, kind): their scales follow
    raw: list[Raw] = field(default_factory=list)
    lease: Lease | None = None  # the chunk's buffers: read into, packed into, back once every owner wrote


@dataclass
class Piece:
    """A piece of one rank's non-expert tensor, ready to write."""

    rank: int
    name: str
    data: torch.Tensor


@dataclass
class RankShare:
    """What one rank writes of a chunk: weight bytes (in pieces, file order) and the chunk's scales."""

    chunk: Chunk
    pieces: list[torch.Tensor]
    scale: torch.Tensor


def _slots(streams: list[RankStream]) -> list[RankTensor]:
    """The stream positions, which every rank shares (same names in the same order)."""
    first = streams[0].tensors
    for s in streams[1:]:
        if [t.name for t in s.tensors] != [t.name for t in first]:
            raise ValueError(f"rank {s.geometry.rank}'s stream does not list the same tensors as rank {streams[0].geometry.rank}'s")
    return list(first)


def _work(source: SourceCheckpoint, streams: list[RankStream], chunk_bytes: int):
    """The items of the whole stream in order: chunks of experts and (rank, tensor) jobs."""
    m = source.shape
    by_rank = {s.geometry.rank: s for s in streams}
    experts_per_rank = streams[0].geometry.num_local_experts
    for i, slot in enumerate(_slots(streams)):
        recipe = slot.recipe
        if isinstance(recipe, ExpertTensor):
            if recipe.kind not in ("w13_weight", "w2_weight"):
                continue  # scales are written by each rank's writer after its last chunk of the weight
            scale_name = output_format.expert_tensor_name(recipe.layer, recipe.kind + "_scale_inv")
            wanting = [s.geometry for s in streams if s.sink.wants(slot.name) or s.sink.wants(scale_name)]
            todo = [Chunk(recipe.layer, recipe.kind, experts, [g for g in wanting if experts.start in g.experts], [])
                    for experts in expert_chunks(m, experts_per_rank, source.kind, chunk_bytes)]
            todo = [c for c in todo if c.owners]
            for g in wanting:
                last = max(j for j, c in enumerate(todo) if g in c.owners)
                todo[last].finishes.append(g.rank)
            yield from todo
        else:
            for rank, s in by_rank.items():
                if s.sink.wants(slot.name):
                    yield (rank, s.tensors[i])


# -- the pipeline --------------------------------------------------------------------------------


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


class _Reader(threading.Thread):
    """Reads the stream's work in order: each chunk of source experts into buffers of its own lease,
    each non-expert tensor as pieces (sliced, padded, re-quantised by `produce`)."""

    def __init__(self, source: SourceCheckpoint, streams: list[RankStream], chunk_bytes: int, piece_bytes: int,
                 pool: BufferPool, failure: _Failure):
        super().__init__(name="mm-convert-read", daemon=True)
        self.source, self.streams, self.chunk_bytes, self.piece_bytes = source, streams, chunk_bytes, piece_bytes
        self.pool, self.failure = pool, failure
        self.outbox: queue.Queue = queue.Queue(maxsize=1)
        self.requant = RequantCache(capacity=2 * len(streams))

    def _read_chunk(self, chunk: Chunk) -> None:
        source, m = self.source, self.source.shape
        projs = GATE_UP if chunk.kind == "w13_weight" else DOWN
        wshape = (len(chunk.experts), *m.expert_weight_shapes[projs[0]])
        wdtype = torch.uint8 if source.kind == "fp8" else source.info(
            model.expert_weight_name(chunk.layer, chunk.experts.start, projs[0])).torch_dtype
        chunk.lease = self.pool.lease()
        for proj in projs:
            weight = chunk.lease.take(wshape, wdtype)
            scale = (chunk.lease.take((len(chunk.experts), *model.scale_shape(wshape[1:])), torch.float32)
                     if source.kind == "fp8" else None)
            chunk.raw.append(read_raw(source, chunk.layer, chunk.experts, proj, weight, scale))

    def run(self) -> None:
        try:
            for item in _work(self.source, self.streams, self.chunk_bytes):
                if isinstance(item, Chunk):
                    self._read_chunk(item)
                    if not _put(self.outbox, item, self.failure):
                        return
                    continue
                rank, tensor = item
                for data in produce(self.source, tensor, self.piece_bytes, self.requant):
                    if not _put(self.outbox, Piece(rank, tensor.name, data), self.failure):
                        return
            _put(self.outbox, None, self.failure)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.failure.set(exc)


class _RankWriter(threading.Thread):
    """Hands one rank's pieces to its sink, in order, and its scales after its last chunk of a weight."""

    def __init__(self, stream: RankStream, pool: BufferPool, failure: _Failure):
        super().__init__(name=f"mm-convert-write-rank{stream.geometry.rank}", daemon=True)
        self.rank, self.sink, self.pool, self.failure = stream.geometry.rank, stream.sink, pool, failure
        self.inbox: queue.Queue = queue.Queue(maxsize=2)
        self.scales: list[torch.Tensor] = []

    def run(self) -> None:
        try:
            while (item := _get(self.inbox, self.failure)) is not None:
                if isinstance(item, Piece):
                    self.sink.write(item.name, item.data)
                    continue
                chunk = item.chunk
                name = output_format.expert_tensor_name(chunk.layer, chunk.kind)
                for piece in item.pieces:
                    self.sink.write(name, piece)
                self.scales.append(item.scale)
                item.pieces = []
                chunk.lease.release()
                if self.rank in chunk.finishes:
                    if self.sink.wants(name + "_scale_inv"):
                        self.sink.write(name + "_scale_inv", torch.cat(self.scales).contiguous())
                    self.scales = []
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.failure.set(exc)


class _Transform:
    """The calling thread's work: checks, quantisation and the profile's pack of each owner's share."""

    def __init__(self, source: SourceCheckpoint, profile: Profile, streams: dict[int, RankStream],
                 pool: BufferPool, device: str, digests: DigestCollector | None = None):
        self.source, self.profile, self.streams, self.pool, self.device = source, profile, streams, pool, device
        self.digests = digests
        m = source.shape
        self.stream_gate_up = profile.gate_up_is_a_view and device == "cpu"
        self.scratch: torch.Tensor | None = None
        ip = next(iter(streams.values())).geometry.padded_intermediate_size
        self.zeros = torch.zeros(ip * m.hidden_size, dtype=torch.uint8)

    def _pooled(self, chunk: Chunk, g: RankGeometry) -> torch.Tensor:
        """A reusable host buffer for one rank's packed weight."""
        shapes = self.profile.shapes(self.source.shape.hidden_size, g)
        shape = (len(chunk.experts), *(shapes.w13 if chunk.kind == "w13_weight" else shapes.w2)[1:])
        return chunk.lease.take(shape, torch.uint8)

    def _quantised_buffer(self, chunk: Chunk, raw: Raw) -> torch.Tensor | None:
        """A reusable FP8 buffer for a BF16 projection's quantised weights (host transforms only)."""
        if raw.scale is not None or self.device != "cpu":
            return None
        return chunk.lease.take(tuple(raw.weight.shape), torch.uint8)

    def _packed_on_host(self, chunk: Chunk, g: RankGeometry, pack, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack on the transform device; a GPU result is copied into a pinned pooled host buffer."""
        host = self._pooled(chunk, g)
        if self.device == "cpu":
            packed = pack(batch, g, out=host)
        else:
            packed = pack(batch, g)
            host.copy_(packed.weight.view(torch.uint8))
        return host, packed.scale.cpu()

    def shares(self, chunk: Chunk) -> list[RankShare]:
        if self.scratch is None and self.source.kind != "fp8":
            self.scratch = torch.empty(chunk.raw[0].weight.numel(), dtype=torch.float32, device=self.device)
        values = [ready(self.source, chunk.layer, chunk.experts, r, self.device, self.scratch,
                        self._quantised_buffer(chunk, r)) for r in chunk.raw]
        if self.digests is not None:
            for r, (weight, scale) in zip(chunk.raw, values):
                self.digests.add_experts(chunk.layer, r.proj, chunk.experts, weight, scale)
        chunk.raw = []
        name = output_format.expert_tensor_name(chunk.layer, chunk.kind)
        shares = []
        for g in chunk.owners:
            want_weight = self.streams[g.rank].sink.wants(name)
            if chunk.kind == "w13_weight":
                (gate, gate_s), (up, up_s) = values
                batch = GateUp(gate, up, gate_s, up_s)
                if not want_weight:
                    share = RankShare(chunk, [], sglang_gate_up_scale(batch, g).cpu())
                elif self.stream_gate_up:  # write straight from the source buffers: no packed copy
                    share = RankShare(chunk, sglang_gate_up_segments(batch, g, self.zeros), sglang_gate_up_scale(batch, g))
                else:
                    weight, scale = self._packed_on_host(chunk, g, self.profile.pack_gate_up, batch)
                    share = RankShare(chunk, [weight], scale)
            else:
                ((down, down_s),) = values
                if not want_weight:  # every profile leaves the scales as the sglang profile lays them out
                    share = RankShare(chunk, [], sglang_down_scale(Down(down, down_s), g).cpu())
                else:
                    weight, scale = self._packed_on_host(chunk, g, self.profile.pack_down, Down(down, down_s))
                    share = RankShare(chunk, [weight], scale)
            shares.append(share)
        return shares


def run_stream(source: SourceCheckpoint, profile: Profile, streams: list[RankStream], chunk_bytes: int,
               device: str = "cpu", piece_bytes: int | None = None, digests: DigestCollector | None = None) -> None:
    """Every wanted tensor of every rank's stream into its sink; closes the sinks (aborts them on error).
    `digests` gets every chunk of source experts read (convert/digests.py)."""
    if not streams:
        return
    pool = BufferPool(pinned=device != "cpu")
    failure = _Failure()
    by_rank = {s.geometry.rank: s for s in streams}
    writers = {r: _RankWriter(s, pool, failure) for r, s in by_rank.items()}
    transform = _Transform(source, profile, by_rank, pool, device, digests)
    piece_bytes = piece_bytes or min(chunk_bytes, 64 * 1024 * 1024)

    reader = _Reader(source, streams, chunk_bytes, piece_bytes, pool, failure)
    to_transform = reader.outbox
    try:
        for w in writers.values():
            w.start()
        reader.start()
        while (item := _get(to_transform, failure)) is not None:
            if isinstance(item, Piece):
                if not _put(writers[item.rank].inbox, item, failure):
                    break
                continue
            shares = transform.shares(item)
            item.lease.hold(len(shares))
            for share, g in zip(shares, item.owners):
                if not _put(writers[g.rank].inbox, share, failure):
                    break
        for w in writers.values():
            _put(w.inbox, None, failure)
        reader.join()
        for w in writers.values():
            w.join()
        if failure.error is not None:
            raise failure.error
        for s in streams:
            s.sink.close()
    except BaseException as exc:
        failure.set(exc)
        reader.join(timeout=10)
        for w in writers.values():
            w.join(timeout=10)
        for s in streams:
            s.sink.abort()
        raise
