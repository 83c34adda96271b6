"""MiniMax-M2 routing, computed outside the kernel and packed as the routed kernel takes it.

`scores = sigmoid(hidden @ gate.T)` in fp32; the top-k experts are chosen by
`scores + e_score_correction_bias`; their weights are the unbiased scores divided by their sum
(routed scaling factor 1.0). The routed kernel takes int32 `(expert_id << 16) | bf16 bits of the
weight` and uses the weights as given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    ids: torch.Tensor  # [T, k] int64, global expert ids
    weights: torch.Tensor  # [T, k] fp32, already rounded to bf16 (what the kernel sees)
    packed: torch.Tensor  # [T, k] int32


def route(hidden: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, top_k: int) -> Routing:
    scores = torch.sigmoid(hidden.float() @ gate.float().t())
    _, ids = torch.topk(scores + bias.float(), top_k, dim=-1)
    chosen = scores.gather(1, ids)
    weights = (chosen / chosen.sum(dim=-1, keepdim=True)).to(torch.bfloat16)
    return Routing(ids=ids, weights=weights.float(), packed=pack_topk(ids, weights))


def pack_topk(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # Mask the low half: FlashInfer's test idiom sign-extends a negative weight into the id.
    low = weights.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return (ids.to(torch.int32) << 16) | low


def unpack_topk(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = (packed >> 16).to(torch.int64)
    low = (packed & 0xFFFF).to(torch.int32)
    signed = torch.where(low >= 0x8000, low - 0x10000, low).to(torch.int16)
    return ids, signed.view(torch.bfloat16).float()
