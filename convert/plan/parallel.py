"""Parallel shapes: which experts and which intermediate rows each serving rank holds.

Rank arithmetic follows SGLang's parallel state (checked against its source: docs/VERIFIED.md):
`moe_tp = tp / ep`, `moe_tp_rank = r % moe_tp`, `moe_ep_rank = r // moe_tp`; each EP rank holds a
contiguous block of experts; each MoE-TP rank a 128-padded slice of the intermediate dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm_convert.errors import RequestError
from mm_convert.model import QUANT_BLOCK, ModelShape

MAX_TP = 16


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ParallelShape:
    """A serving launch shape: `tp` ranks in all, experts split `ep` ways."""

    tp: int
    ep: int

    @property
    def moe_tp(self) -> int:
        return self.tp // self.ep

    @property
    def dirname(self) -> str:
        return f"tp{self.tp}-ep{self.ep}"

    @property
    def label(self) -> str:
        return f"TP{self.tp}" if self.ep == 1 else f"TP{self.tp} EP{self.ep}"

    def validate(self, model: ModelShape) -> None:
        """Refuse a shape that cannot be served, with the reason in one line."""
        if not 1 <= self.tp <= MAX_TP:
            raise RequestError(f"tp={self.tp} is out of range: tp must be between 1 and {MAX_TP}")
        if self.ep < 1 or self.tp % self.ep:
            raise RequestError(f"ep={self.ep} must divide tp={self.tp} (moe_tp = tp / ep)")
        if model.num_experts % self.ep:
            raise RequestError(
                f"ep={self.ep} does not divide the {model.num_experts} experts: each EP rank must hold a whole block"
            )
        if model.intermediate_size // self.moe_tp == 0:
            raise RequestError(
                f"moe_tp={self.moe_tp} exceeds intermediate_size={model.intermediate_size}: ranks would hold no rows"
            )

    def experts_per_rank(self, model: ModelShape) -> int:
        return model.num_experts // self.ep

    def padded_intermediate_size(self, model: ModelShape) -> int:
        """I_p: the per-rank intermediate size, rounded up to the kernel's 128-row tile."""
        return round_up(model.intermediate_size // self.moe_tp, QUANT_BLOCK)

    def rank(self, model: ModelShape, rank: int) -> "RankGeometry":
        if not 0 <= rank < self.tp:
            raise ValueError(f"rank {rank} out of range for tp={self.tp}")
        experts = self.experts_per_rank(model)
        return RankGeometry(
            rank=rank,
            moe_tp_rank=rank % self.moe_tp,
            moe_ep_rank=rank // self.moe_tp,
            first_expert=(rank // self.moe_tp) * experts,
            num_local_experts=experts,
            intermediate_size=model.intermediate_size,
            padded_intermediate_size=self.padded_intermediate_size(model),
        )

    def ranks(self, model: ModelShape) -> list["RankGeometry"]:
        return [self.rank(model, r) for r in range(self.tp)]


@dataclass(frozen=True)
class RankGeometry:
    """What one rank holds: a block of experts and a slice of every expert's intermediate rows."""

    rank: int
    moe_tp_rank: int
    moe_ep_rank: int
    first_expert: int  # = local_expert_offset
    num_local_experts: int
    intermediate_size: int
    padded_intermediate_size: int

    @property
    def experts(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    @property
    def row_start(self) -> int:
        """First source intermediate row of this rank (may lie past the end: an all-zero rank)."""
        return self.moe_tp_rank * self.padded_intermediate_size

    @property
    def real_rows(self) -> int:
        """How many of the rank's I_p rows hold source data; the rest are zero padding."""
        return max(0, min(self.padded_intermediate_size, self.intermediate_size - self.row_start))

    @property
    def scale_row_start(self) -> int:
        return self.row_start // QUANT_BLOCK

    @property
    def padded_scale_rows(self) -> int:
        return self.padded_intermediate_size // QUANT_BLOCK

    @property
    def real_scale_rows(self) -> int:
        """Scale blocks backed by source scales (a partial last block still has its source scale)."""
        source_blocks = -(-self.intermediate_size // QUANT_BLOCK)
        return max(0, min(self.padded_scale_rows, source_blocks - self.scale_row_start))
