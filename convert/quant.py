"""FP8 e4m3 quantisation with 128x128 block scales (SPEC section 2).

Per block of a `[N, K]` weight: `scale = amax(|block|) / 448` in float32 (1.0 for an all-zero
block), then `q = w / scale` cast to float8_e4m3fn (round to nearest even).
Division, not a multiplication by the reciprocal: this is FlashInfer's own rule
(`fp8_block_quant_2d`, shipped in flashinfer 0.6.13 and used by its DeepSeek-FP8 MoE tests) and the
results are bit-identical to it. SPEC section 2 said `max(amax / 448, 1e-12)` and a clamp to ±448;
the floor differs from FlashInfer for all-zero and near-zero blocks (docs/VERIFIED.md has the
evidence), and the clamp never changes anything: |w / scale| <= 448 up to one rounding, which every
cast (CPU saturating, CUDA's RN) maps to 448, far from the 464 where CUDA's would give NaN. Stored scales are what the checkpoints call `weight_scale_inv` (dequantised
value = fp8 value x scale).
"""

from __future__ import annotations

import torch

from convert.model import FP8_MAX, QUANT_BLOCK


def _blocked(w: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """View a `[..., N, K]` tensor as `[..., N/128, 128, K/128, 128]`, zero-padding edge blocks."""
    n, k = w.shape[-2:]
    pad_n, pad_k = -n % QUANT_BLOCK, -k % QUANT_BLOCK
    if pad_n or pad_k:
        # Zeros never raise a block's amax, so padding leaves edge-block scales unchanged.
        w = torch.nn.functional.pad(w, (0, pad_k, 0, pad_n))
    lead = w.shape[:-2]
    nb, kb = w.shape[-2] // QUANT_BLOCK, w.shape[-1] // QUANT_BLOCK
    return w.reshape(*lead, nb, QUANT_BLOCK, kb, QUANT_BLOCK), n, k


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 (1.0 where amax is 0), a true float32 division on every device.

    The divisor is a tensor on purpose: PyTorch's CUDA kernel turns division by a Python scalar into
    multiplication by its reciprocal (`div_true_kernel_cuda`, "may lose one bit of precision"), which
    changes some scales by one ulp and made GPU conversions differ from CPU ones.
    """
    # `amax == 0` rather than FlashInfer's `amax > 0`: the same for every finite amax, but a NaN block
    # keeps a NaN scale (instead of 1.0), so the caller can refuse it.
    return torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, FP8_MAX))


def _block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """max |w| per block of a `_blocked` view, float32 `[..., N/128, K/128]` (NaN if a block has NaN).

    Reduces the contiguous 128-wide rows first with amax and amin (no |w| temporary): about three
    times faster on a CPU than one reduction over both block dimensions.
    """
    top = blocks.amax(dim=-1)
    bottom = blocks.amin(dim=-1)
    return torch.maximum(top, -bottom).amax(dim=-2).to(torch.float32)


def quantize_fp8_block(w: torch.Tensor, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `[..., N, K]` weights to (fp8 `[..., N, K]`, fp32 scales `[..., ceil(N/128), ceil(K/128)]`).

    `scratch` (float32, at least as many elements as the padded weight) and `out` (float8_e4m3fn or
    uint8, the weight's shape) are optional reused buffers: with them a call allocates nothing
    large, which on a CPU saves a page fault per 4 KiB (half the conversion's time, measured). The
    results do not depend on them.
    """
    blocks, n, k = _blocked(w)
    scale = _scale_of(_block_amax(blocks))
    numel = blocks.numel()
    if scratch is not None and scratch.numel() >= numel and scratch.dtype == torch.float32 and scratch.device == w.device:
        quotient = scratch.reshape(-1)[:numel].view(blocks.shape)
    else:
        quotient = torch.empty(blocks.shape, dtype=torch.float32, device=w.device)
    # Widen into the float32 buffer, divide in place (FlashInfer's rule: a true division), then cast.
    # Separate passes: a mixed-dtype division would widen into a hidden temporary, and on CPUs the
    # fused divide-and-cast is not vectorised. |w / scale| <= 448 up to one rounding, so no clamp is
    # needed (and none changes a finite result).
    quotient.copy_(blocks)
    quotient.div_(scale[..., :, None, :, None])
    padded = quotient.view(*w.shape[:-2], blocks.shape[-4] * QUANT_BLOCK, blocks.shape[-2] * QUANT_BLOCK)
    if padded.shape[-2:] != (n, k):
        padded = padded[..., :n, :k]
    if out is None:
        out = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    out.view(torch.float8_e4m3fn).copy_(padded)
    return out.view(torch.float8_e4m3fn), scale


def dequantize_fp8_block(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 values of block-quantised weights: fp8 value x its block's scale."""
    n, k = q.shape[-2:]
    expanded = scale.to(torch.float32).repeat_interleave(QUANT_BLOCK, dim=-2).repeat_interleave(QUANT_BLOCK, dim=-1)
    return q.to(torch.float32) * expanded[..., :n, :k]


def quantize_fp8_per_token_group(x: torch.Tensor, group: int = QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations `[T, H]` -> (fp8 `[T, H]`, fp32 scales `[T, H/group]`), one scale per token per group.

    The same rule as the weights (amax / 448, 1.0 for an all-zero group, divide, cast): what the
    DeepSeek-FP8 MoE kernels take as `hidden_states` (they want the scales transposed, `[H/128, T]`).
    """
    t, h = x.shape
    groups = x.to(torch.float32).reshape(t, h // group, group)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    scale = _scale_of(amax)
    q = torch.clamp(groups / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(t, h), scale.squeeze(-1)
