"""An independent, deliberately naive implementation of SPEC section 4, for the tests.

Built row by row from the rules as written (not from mm_convert.transform.profiles), so that a mistake in
the vectorised code does not repeat itself here.
"""

from __future__ import annotations

import torch

BLOCK = 128

# TRT-LLM's srcToDstBlk16RowMap, as published: source row i of a 16-row block lands at row MAP16[i].
MAP16 = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]


def ranks_of(tp: int, ep: int, num_experts: int, intermediate: int):
    """Per rank: (moe_tp_rank, first expert, local experts, I_p), by the SPEC's formulas."""
    moe_tp = tp // ep
    e_loc = num_experts // ep
    i_p = -(-(intermediate // moe_tp) // BLOCK) * BLOCK
    return [(r % moe_tp, (r // moe_tp) * e_loc, e_loc, i_p) for r in range(tp)]


def _rows(src: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Rows [first, first+count) of src, zero rows where the source has none."""
    out = torch.zeros((count, *src.shape[1:]), dtype=src.dtype)
    for j in range(count):
        if first + j < src.shape[0]:
            out[j] = src[first + j]
    return out


def sglang_expert(w1, w3, w2, s1, s3, s2, moe_tp_rank: int, i_p: int):
    """One expert's (w13, w13_scale, w2, w2_scale) on one rank; weights as uint8 bytes."""
    t = moe_tp_rank
    w13 = torch.cat([_rows(w3, t * i_p, i_p), _rows(w1, t * i_p, i_p)])
    b = i_p // BLOCK
    w13_s = torch.cat([_rows(s3, t * b, b), _rows(s1, t * b, b)])
    w2_out = _rows(w2.t().contiguous(), t * i_p, i_p).t().contiguous()
    w2_s = _rows(s2.t().contiguous(), t * b, b).t().contiguous()
    return w13, w13_s, w2_out, w2_s


def shuffle_rows_naive(w: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        block, within = divmod(i, 16)
        out[block * 16 + MAP16[within]] = w[i]
    return out


def block_major_naive(w: torch.Tensor) -> torch.Tensor:
    m, k = w.shape
    out = torch.empty((k // BLOCK, m, BLOCK), dtype=w.dtype)
    for kb in range(k // BLOCK):
        out[kb] = w[:, kb * BLOCK : (kb + 1) * BLOCK]
    return out
