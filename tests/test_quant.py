"""FP8 128x128 block quantisation: bit-identical to FlashInfer's rule, and to the rule written out."""

from __future__ import annotations

import pytest
import torch
from flashinfer.trace.templates._init_helpers import fp8_block_quant_2d

from mm_convert.transform.quant import dequantize_fp8_block, quantize_fp8_block


def _awkward(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3) * 4
    w[..., :128, :128] = 0  # an all-zero block
    w[..., 128:256, :128] *= 1e-30  # a block of bf16 subnormals
    w[..., 0, 200] = 3.0e4  # one outlier dominating its block
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(256, 256), (384, 512), (2, 256, 384)])
def test_bit_identical_to_flashinfer(shape):
    w = _awkward(shape, 0)
    q, s = quantize_fp8_block(w)
    q_ref, s_ref = fp8_block_quant_2d(w)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))


def _naive(w: torch.Tensor):
    """The rule as written, block by block, edge blocks covering what is left."""
    n, k = w.shape
    nb, kb = -(-n // 128), -(-k // 128)
    q = torch.empty((n, k), dtype=torch.float8_e4m3fn)
    s = torch.empty((nb, kb))
    for i in range(nb):
        for j in range(kb):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = block.abs().max()
            scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            s[i, j] = scale
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = torch.clamp(block / scale, -448, 448).to(torch.float8_e4m3fn)
    return q, s


@pytest.mark.parametrize("shape", [(300, 200), (128, 129), (1, 5), (257, 384)])
def test_edge_blocks_match_the_rule(shape):
    w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    q, s = quantize_fp8_block(w)
    q_ref, s_ref = _naive(w)
    assert q.shape == w.shape and s.shape == s_ref.shape
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)


def test_dequantised_error_is_small():
    w = (torch.randn(512, 768) * 0.02).to(torch.bfloat16)
    q, s = quantize_fp8_block(w)
    rel = (dequantize_fp8_block(q, s) - w.float()).norm() / w.float().norm()
    assert 0 < rel < 0.04  # e4m3 keeps 3 mantissa bits: about 2-3% relative L2 on Gaussian weights
