"""The conversion plan: every output file and tensor, with shapes and byte offsets, before any byte moves.

`build_plan` is pure: it looks at the source's headers and the requested (profile, tp, ep) and
returns plain data. Executing the plan (mm_convert.commands.convert) is a separate loop that fills the
planned byte ranges in order.
"""

from __future__ import annotations
import math
from dataclasses import dataclass, field
from mm_convert import output_format
from mm_convert.plan import presharded, sglang_state
from mm_convert.errors import RequestError
from mm_convert.model import ModelShape
from mm_convert.output_format import EXPERT_DTYPES, ExpertTensorKind
from mm_convert.plan.parallel import ParallelShape, RankGeometry
from mm_convert.transform.profiles import Profile, RankTensorShapes
from mm_convert.read.safetensors_file import DTYPES, TensorEntry, encode_header
from mm_convert.plan.sglang_state import PreshardedTarget, RankTensor
from mm_convert.read.source import SourceCheckpoint


@dataclass(frozen=True)
class PlannedTensor(TensorEntry):
    """One tensor of an output file: where it goes (the entry) and where it comes from."""

    source: str | None = None  # pass-through tensors: the source tensor copied unchanged
    layer: int | None = None  # expert tensors: layer and kind
    kind: ExpertTensorKind | None = None
    ref: str | None = None  # the rank-stream tensor whose bytes fill it (default: `name`)


@dataclass(frozen=True)
class PlannedFile:
    """One output safetensors file; `header` is final, so every tensor's file offset is known."""

    path: str  # relative to the output folder
    tensors: tuple[PlannedTensor, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    rank: int | None = None
    part: int | None = None
    layers: tuple[int, ...] = ()
    # presharded: tensors are stored under their content hashes, known once written (the planned
    # names are placeholders of the same length; a content repeated within the file is kept once)
    content_keys: bool = False

    @property
    def header(self) -> bytes:
        return encode_header(self.tensors, self.metadata)

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_size


@dataclass(frozen=True)
class PartGroup:
    """Consecutive layers stored together: one part file per rank."""

    part: int
    layers: tuple[int, ...]


@dataclass(frozen=True)
class ConversionPlan:
    profile: Profile
    parallel: ParallelShape
    model: ModelShape
    source_kind: str
    part_size: int
    ranks: tuple[RankGeometry, ...]
    rank_shapes: RankTensorShapes
    shards: tuple[PlannedFile, ...]  # non-expert tensors, bytes unchanged
    part_groups: tuple[PartGroup, ...]
    expert_files: tuple[PlannedFile, ...]  # ordered by (part, rank)
    auxiliary_files: tuple[str, ...]

    def expert_file(self, rank: int, part: int) -> PlannedFile:
        return self.expert_files[part * self.parallel.tp + rank]

    @property
    def files(self) -> tuple[PlannedFile, ...]:
        return self.shards + self.expert_files

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def padded_intermediate_size(self) -> int:
        return self.ranks[0].padded_intermediate_size


def _pack_files(items: list[tuple[str, str, tuple[int, ...], str]], part_size: int) -> list[list[PlannedTensor]]:
    """Greedy packing of (name, dtype, shape, source) into files of at most `part_size` bytes."""
    files: list[list[PlannedTensor]] = [[]]
    offset = 0
    for name, dtype, shape, source in items:
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if files[-1] and offset + nbytes > part_size:
            files.append([])
            offset = 0
        files[-1].append(PlannedTensor(name, dtype, shape, offset, source=source))
        offset += nbytes
    return files


def _layer_sort_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return (int(parts[2]), name)
    return (-1 if "embed" in name else 1 << 30, name)


def plan_shards(source: SourceCheckpoint, part_size: int) -> tuple[PlannedFile, ...]:
    names = sorted(source.non_expert_names(), key=_layer_sort_key)
    items = [(n, source.tensors[n].dtype, source.tensors[n].shape, n) for n in names]
    packed = _pack_files(items, part_size)
    return tuple(
        PlannedFile(output_format.shard_file_name(i, len(packed)), tuple(ts), {"format": "pt"})
        for i, ts in enumerate(packed)
    )


def plan_part_groups(layer_bytes: int, num_layers: int, part_size: int) -> tuple[PartGroup, ...]:
    """Whole layers per part, as many as fit in `part_size` (always at least one)."""
    per_part = max(1, part_size // layer_bytes)
    return tuple(
        PartGroup(p, tuple(range(start, min(start + per_part, num_layers))))
        for p, start in enumerate(range(0, num_layers, per_part))
    )


def build_plan(source: SourceCheckpoint, profile: Profile, parallel: ParallelShape, part_size: int) -> ConversionPlan:
    """Everything the conversion will write, with offsets; refuses an impossible request up front."""
    shape = source.shape
    parallel.validate(shape)
    if part_size <= 0:
        raise RequestError(f"part size must be positive, got {part_size}")
    ranks = tuple(parallel.ranks(shape))
    if ranks[0].padded_intermediate_size * parallel.moe_tp < shape.intermediate_size:
        raise RequestError(
            f"moe_tp={parallel.moe_tp}: ranks of {ranks[0].padded_intermediate_size} rows cannot cover "
            f"intermediate_size={shape.intermediate_size}"
        )
    rank_shapes = profile.shapes(shape.hidden_size, ranks[0])
    kinds_and_shapes: tuple[tuple[ExpertTensorKind, tuple[int, ...]], ...] = (
        ("w13_weight", rank_shapes.w13),
        ("w13_weight_scale_inv", rank_shapes.w13_scale),
        ("w2_weight", rank_shapes.w2),
        ("w2_weight_scale_inv", rank_shapes.w2_scale),
    )
    layer_bytes = sum(math.prod(s) * DTYPES[EXPERT_DTYPES[k]][1] for k, s in kinds_and_shapes)
    groups = plan_part_groups(layer_bytes, shape.num_layers, part_size)

    expert_files = []
    for group in groups:
        for g in ranks:
            tensors = []
            offset = 0
            for layer in group.layers:
                for kind, kshape in kinds_and_shapes:
                    name = output_format.expert_tensor_name(layer, kind)
                    t = PlannedTensor(name, EXPERT_DTYPES[kind], kshape, offset, layer=layer, kind=kind, ref=name)
                    tensors.append(t)
                    offset += t.nbytes
            metadata = {"format": "pt", **output_format.part_metadata(profile.name, parallel, g)}
            expert_files.append(
                PlannedFile(
                    output_format.rank_part_file_name(parallel, g.rank, group.part),
                    tuple(tensors),
                    metadata,
                    rank=g.rank,
                    part=group.part,
                    layers=group.layers,
                )
            )

    return ConversionPlan(
        profile=profile,
        parallel=parallel,
        model=shape,
        source_kind=source.kind,
        part_size=part_size,
        ranks=ranks,
        rank_shapes=rank_shapes,
        shards=plan_shards(source, part_size),
        part_groups=groups,
        expert_files=tuple(expert_files),
        auxiliary_files=tuple(source.auxiliary_files()),
    )


# -- presharded: SGLang's own per-rank state ------------------------------------------------------


@dataclass(frozen=True)
class PreshardedPlan:
    """The structure of a presharded conversion, before content keys are known.

    `states` holds every rank of the launch (the folder key and checksum.json cover them all, even
    when only `ranks` are written); each state is in stream order.
    """

    target: PreshardedTarget
    model: ModelShape
    source_kind: str
    states: tuple[tuple[RankTensor, ...], ...]
    geometry: tuple[RankGeometry, ...]
    shard_config: dict
    folder: str  # relative to OUT: <root named for backend and GPU>/TP-{tp}-sig-{h16}
    ranks: tuple[int, ...]  # the ranks whose files this conversion writes
    auxiliary_files: tuple[str, ...]
    max_file_bytes: int

    @property
    def parallel(self) -> ParallelShape:
        return self.target.parallel

    @property
    def root(self) -> str:
        return self.folder.split("/")[0]

    @property
    def padded_intermediate_size(self) -> int:
        return self.geometry[0].padded_intermediate_size

    @property
    def state_bytes(self) -> int:
        """Bytes of every tensor every rank holds (before deduplication)."""
        return sum(t.nbytes for state in self.states for t in state)


def _check_every_tensor_used(source: SourceCheckpoint, states) -> None:
    """Every source tensor becomes part of some rank's state, or is one SGLang skips on purpose;
    anything else would vanish silently (SGLang's own loader skips names it has no parameter for)."""
    used = {name for state in states for t in state for name in sglang_state.sources_of(t.recipe)}
    for name, info in source.tensors.items():
        if name in used or source.is_expert(name) or sglang_state.not_loaded_by_sglang(name, source.config):
            continue
        raise RequestError(f"{info.path}: tensor {name}: SGLang's MiniMax-M2 model has no parameter for it, so a "
                           "presharded folder cannot hold it (SGLang's own loader would skip it silently); refused")


def parse_ranks(text: str | None, tp: int) -> tuple[int, ...]:
    """`--ranks 0,1` (or `0-3`) -> the ranks to write; None: all of them."""
    if text is None or not str(text).strip():
        return tuple(range(tp))
    ranks: set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            ranks.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise RequestError(f"--ranks {text!r}: give rank numbers separated by commas, e.g. 0,1 or 0-3") from None
    bad = sorted(r for r in ranks if not 0 <= r < tp)
    if bad or not ranks:
        raise RequestError(f"--ranks {text!r}: ranks must lie in 0..{tp - 1} for tp={tp}")
    return tuple(sorted(ranks))


def build_presharded_plan(source: SourceCheckpoint, target: PreshardedTarget, ranks: tuple[int, ...] | None = None,
                          max_file_bytes: int = presharded.MAX_FILE_BYTES) -> PreshardedPlan:
    """Every rank's tensors and the folder key; refuses a launch SGLang would refuse, up front."""
    target.check()
    parallel = target.parallel
    parallel.validate(source.shape)
    launch = presharded.launch_state(source, target)
    _check_every_tensor_used(source, launch.states)
    return PreshardedPlan(
        target=target,
        model=source.shape,
        source_kind=source.kind,
        states=launch.states,
        geometry=tuple(parallel.ranks(source.shape)),
        shard_config=launch.shard_config,
        folder=launch.folder,
        ranks=tuple(range(parallel.tp)) if ranks is None else ranks,
        auxiliary_files=tuple(source.auxiliary_files()),
        max_file_bytes=max_file_bytes,
    )


@dataclass(frozen=True)
class PreshardedLayout:
    """The files of a presharded folder: which stored tensors, from which rank stream, in what order.

    Keys are content hashes, known only once the bytes are made: a file is planned with fixed-length
    placeholder keys (its header's length is final), written with its data streaming behind that
    header, and its header rewritten in place with the real keys when the file is complete.
    """

    plan: PreshardedPlan
    layout: tuple[presharded.LayoutFile, ...]
    files: tuple[PlannedFile, ...]  # one per layout file, same order; `rank` = the rank that writes it

    @property
    def needed(self) -> tuple[PlannedFile, ...]:
        """The data files the plan's ranks read (all of them for a full conversion)."""
        wanted = set(self.plan.ranks)
        return tuple(f for f, lf in zip(self.files, self.layout) if wanted & set(lf.ranks))

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.needed)


def placeholder_key(index: int) -> str:
    """A stand-in of a content key's exact length (32 hex digits), unique within a file."""
    return f"{index:0{presharded.CONTENT_HASH_HEX}x}"


def lay_out_presharded(plan: PreshardedPlan, small_keys: list[dict[str, str]]) -> PreshardedLayout:
    """Deduplicated, rank-grouped files, layer by layer, with headers of final length.

    `small_keys[r]` holds the content keys of rank r's non-expert tensors (a cheap first pass: about
    2% of the bytes), so equal non-expert contents are stored once exactly as SGLang's own dump
    stores them; expert tensors are deduplicated by what the plan proves (`expert_identity`).
    """
    identities = [[("content", keys[t.name]) if t.name in keys else sglang_state.expert_identity(t, g) for t in state]
                  for state, g, keys in zip(plan.states, plan.geometry, small_keys)]
    files = presharded.layout(plan.states, identities, plan.model.num_layers, plan.max_file_bytes)
    planned = []
    for lf in files:
        tensors, offset = [], 0
        for i, t in enumerate(lf.tensors):
            tensors.append(PlannedTensor(placeholder_key(i), t.dtype, t.shape, offset, ref=t.producer[1]))
            offset += t.nbytes
        planned.append(PlannedFile(f"{plan.folder}/{lf.name}", tuple(tensors), {}, rank=lf.writer_rank,
                                   content_keys=True))
    return PreshardedLayout(plan, files, tuple(planned))
