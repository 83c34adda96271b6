"""Executing the recipes of non-expert rank tensors (convert/sglang_state.py): a dumb loop.

`produce` yields a tensor's bytes as contiguous CPU pieces in order, each at most about
`piece_bytes`, so a 1.2 GB embedding never sits in memory whole. Bytes are copied as stored when
the dtype does not change; otherwise values are cast as SGLang's `param.copy_` casts them (round to
nearest even). Expert tensors are not made here: the expert pipeline (convert/transform.py) makes
them with the layout profile.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import torch

from mm_convert.model import QUANT_BLOCK
from mm_convert.transform.quant import requant_ue8m0
from mm_convert.read.safetensors_file import DTYPES
from mm_convert.plan.sglang_state import Assemble, Constant, RankTensor, Rows, Ue8m0Requant, Zeros
from mm_convert.read.source import SourceCheckpoint

DEFAULT_PIECE_BYTES = 64 * 1024 * 1024


def _cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    target = DTYPES[dtype][0]
    return t if t.dtype == target else t.to(target)


def _row_blocks(count: int, row_bytes: int, piece_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, piece_bytes // max(1, row_bytes))
    for start in range(0, count, step):
        yield start, min(step, count - start)


def _assemble_rows(source: SourceCheckpoint, a: Assemble, t: RankTensor, piece_bytes: int) -> Iterator[torch.Tensor]:
    """Axis 0: each part's rows in turn."""
    row_shape = t.shape[1:]
    for part in a.parts:
        if isinstance(part, Zeros):
            row_bytes = max(1, t.nbytes // max(1, t.shape[0]))
            for _, n in _row_blocks(part.count, row_bytes, piece_bytes):
                yield torch.zeros((n, *row_shape), dtype=DTYPES[t.dtype][0])
            continue
        info = source.info(part.source)
        if tuple(info.shape[1:]) != tuple(row_shape):
            raise ValueError(f"{t.name}: rows of {part.source} are {info.shape[1:]}, expected {row_shape}")
        row_bytes = info.nbytes // info.shape[0]
        for start, n in _row_blocks(part.count, row_bytes, piece_bytes):
            yield _cast(source.read_rows(part.source, part.start + start, n), t.dtype)


def _assemble_columns(source: SourceCheckpoint, a: Assemble, t: RankTensor, piece_bytes: int) -> Iterator[torch.Tensor]:
    """Axis 1: for each block of rows, every part's columns side by side."""
    rows = t.shape[0]
    row_bytes = t.nbytes // max(1, rows)
    for start, n in _row_blocks(rows, row_bytes, piece_bytes):
        pieces = []
        for part in a.parts:
            if isinstance(part, Zeros):
                pieces.append(torch.zeros((n, part.count), dtype=DTYPES[t.dtype][0]))
            else:
                block = source.read_rows(part.source, start, n)
                pieces.append(_cast(block[:, part.start : part.start + part.count], t.dtype))
        yield torch.cat(pieces, dim=1).contiguous()


def assemble(source: SourceCheckpoint, a: Assemble, t: RankTensor, piece_bytes: int = DEFAULT_PIECE_BYTES
             ) -> Iterator[torch.Tensor]:
    if a.axis == 0:
        return _assemble_rows(source, a, t, piece_bytes)
    if a.axis == 1:
        return _assemble_columns(source, a, t, piece_bytes)
    raise ValueError(f"{t.name}: cannot assemble along axis {a.axis}")


def _whole(source: SourceCheckpoint, a: Assemble, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    probe = RankTensor("", dtype, shape, a)
    return torch.cat(list(assemble(source, a, probe, piece_bytes=1 << 62)), dim=0).reshape(shape)


class RequantCache:
    """The latest SM100 re-quantisations made (one per rank): a layer's weight and its scales are
    two tensors of each rank's stream, from one computation."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._made: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, source: SourceCheckpoint, r: Ue8m0Requant) -> tuple[torch.Tensor, torch.Tensor]:
        key = (r.weight, r.scale)
        if key not in self._made:
            # Small (one attention projection of one rank) and blockwise over the whole matrix: made whole.
            weight = _whole(source, r.weight, "F8_E4M3", r.weight_shape)
            n, k = r.weight_shape
            scale = _whole(source, r.scale, "F32", (-(-n // QUANT_BLOCK), -(-k // QUANT_BLOCK)))
            self._made[key] = requant_ue8m0(weight, scale)
            while len(self._made) > self.capacity:
                self._made.popitem(last=False)
        return self._made[key]


def produce(source: SourceCheckpoint, t: RankTensor, piece_bytes: int = DEFAULT_PIECE_BYTES,
            requant: RequantCache | None = None) -> Iterator[torch.Tensor]:
    """The bytes of a non-expert rank tensor, as contiguous CPU pieces in order."""
    r = t.recipe
    if isinstance(r, Assemble):
        yield from assemble(source, r, t, piece_bytes)
    elif isinstance(r, Constant):
        yield torch.full(t.shape, r.value, dtype=DTYPES[t.dtype][0])
    elif isinstance(r, Ue8m0Requant):
        q, packed = (requant or RequantCache()).get(source, r)
        yield (q if r.part == "weight" else packed).contiguous()
    else:
        raise ValueError(f"{t.name}: {type(r).__name__} is not a non-expert recipe")


def split(stored: torch.Tensor, a: Assemble) -> list[tuple[Rows | Zeros, torch.Tensor]]:
    """The inverse of an assembly: the stored tensor cut back into its parts (views), in order."""
    out, start = [], 0
    for part in a.parts:
        out.append((part, stored.narrow(a.axis, start, part.count)))
        start += part.count
    if start != stored.shape[a.axis]:
        raise ValueError(f"the parts cover {start} of {stored.shape[a.axis]} indices along axis {a.axis}")
    return out
