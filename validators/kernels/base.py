"""What a routed-MoE backend takes and gives: one rank's kernel-ready tensors and routed inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from mm_convert.model import QUANT_BLOCK
from mm_convert.validators.numerics import Tolerance


@dataclass(frozen=True)
class RoutedInputs:
    """The routed kernel's activation inputs (DeepSeek-FP8 format)."""

    hidden_fp8: torch.Tensor  # [T, H] float8_e4m3fn
    hidden_scale: torch.Tensor  # [H/128, T] fp32, one scale per token per 128 columns
    topk_packed: torch.Tensor  # [T, k] int32: (global expert id << 16) | bf16 weight bits
    num_experts: int
    top_k: int

    def dequantized_hidden(self) -> torch.Tensor:
        scale = self.hidden_scale.t().repeat_interleave(QUANT_BLOCK, dim=1)
        return self.hidden_fp8.float() * scale

    def to(self, device: str | torch.device) -> "RoutedInputs":
        return replace(self, hidden_fp8=self.hidden_fp8.to(device), hidden_scale=self.hidden_scale.to(device),
                       topk_packed=self.topk_packed.to(device))


@dataclass(frozen=True)
class RankWeights:
    """One rank's expert tensors for one layer, exactly as stored, with the profile's kernel flags."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    use_shuffled_weight: bool
    weight_layout: int
    local_expert_offset: int
    local_num_experts: int
    padded_intermediate_size: int
    hidden_size: int

    def to(self, device: str | torch.device) -> "RankWeights":
        return replace(self, w13=self.w13.to(device), w13_scale=self.w13_scale.to(device),
                       w2=self.w2.to(device), w2_scale=self.w2_scale.to(device))


class Backend(Protocol):
    name: str
    tolerance: Tolerance
    device: str

    def run(self, inputs: RoutedInputs, weights: RankWeights, out: torch.Tensor) -> None:
        """Add nothing, overwrite everything: write this rank's `[T, H]` output into `out`."""
