"""The reference backend: a routed FP8 block-scale MoE in plain torch float32, on CPU or GPU.

It consumes a rank's tensors as stored. For the `trtllm` profile (row-shuffled BlockMajorK) it
undoes the layout in index math: row `m` of an expert's MajorK matrix is read from shuffled row
`position[m]` of every K block, a gather over the stored tensor (no inverse-profile copy).
Activations are the kernel's FP8 inputs, dequantised; weights are dequantised per 128x128 block;
everything else is float32.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from mm_convert.transform.profiles import WEIGHT_LAYOUT_BLOCK_MAJOR_K, shuffle_row_indices
from mm_convert.transform.quant import dequantize_fp8_block
from mm_convert.validators.kernels.base import RankWeights, RoutedInputs
from mm_convert.validators.numerics import EXACT_MATH
from mm_convert.validators.routing import unpack_topk


@lru_cache(maxsize=16)
def _row_positions(rows: int, shuffled: bool, device: str) -> torch.Tensor:
    """Where source row m sits in the stored matrix: the inverse of the TRT-LLM row shuffle."""
    if not shuffled:
        return torch.arange(rows, device=device)
    return torch.argsort(shuffle_row_indices(rows)).to(device)


def _major_k(stored: torch.Tensor, e: int, w: RankWeights) -> torch.Tensor:
    """Expert `e`'s `[M, K]` FP8 matrix (as bytes) read through the stored layout."""
    stored = stored.view(torch.uint8)
    if w.weight_layout != WEIGHT_LAYOUT_BLOCK_MAJOR_K:
        matrix = stored[e]
        return matrix[_row_positions(matrix.shape[0], w.use_shuffled_weight, str(matrix.device))]
    kb, m, bk = stored.shape[1:]
    position = _row_positions(m, w.use_shuffled_weight, str(stored.device))
    return stored[e][:, position, :].permute(1, 0, 2).reshape(m, kb * bk)


def _dequant(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8_block(stored.view(torch.float8_e4m3fn), scale)


class ReferenceBackend:
    name = "reference"
    tolerance = EXACT_MATH

    def __init__(self, device: str = "cpu"):
        self.device = device

    def run(self, inputs: RoutedInputs, w: RankWeights, out: torch.Tensor) -> None:
        x = inputs.dequantized_hidden()
        ids, weights = unpack_topk(inputs.topk_packed)
        local = ids - w.local_expert_offset
        ip = w.padded_intermediate_size
        out.zero_()
        for e in torch.unique(local[(local >= 0) & (local < w.local_num_experts)]).tolist():
            tok, slot = (local == e).nonzero(as_tuple=True)
            w13 = _dequant(_major_k(w.w13, e, w), w.w13_scale[e])
            w2 = _dequant(_major_k(w.w2, e, w), w.w2_scale[e])
            h = x[tok] @ w13.t()
            act = torch.nn.functional.silu(h[:, ip:]) * h[:, :ip]  # [up; gate]: silu(gate) * up
            out.index_add_(0, tok, (act @ w2.t()) * weights[tok, slot, None])
