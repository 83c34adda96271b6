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

from mm_convert.model import FP8_MAX, QUANT_BLOCK


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


# -- SM100: SGLang's DeepGEMM re-quantisation of FP8 linear layers ------------------------------
#
# On Blackwell with default settings SGLang 0.5.23 runs block-FP8 linear layers on DeepGEMM, and
# its post-processing (fp8.py L835-848 -> fp8_utils.requant_weight_ue8m0, L2184-2417) replaces each
# layer's weight and scales: dequantise to bf16, re-quantise every 128x128 block with the smallest
# power of two >= amax/448 as its scale (amax floored at 1e-4), and store the scales as UE8M0 bytes
# (the fp32 exponent field), one row per weight row, four K blocks packed little-endian per int32.
# SGLang holds that int32 tensor column-major; its contiguous (row-major) values are what it dumps.
UE8M0_AMAX_FLOOR = 1e-4
UE8M0_PER_INT32 = 4


def packed_ue8m0_scale_shape(weight_shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the packed int32 scales of an `[N, K]` weight: `[N, ceil(ceil(K/128) / 4)]`."""
    n, k = weight_shape
    return (n, -(-(-(-k // QUANT_BLOCK)) // UE8M0_PER_INT32))


def _ue8m0_exponent(x: torch.Tensor) -> torch.Tensor:
    """Biased fp32 exponent of the smallest power of two >= |x| (int32, clamped to [1, 254])."""
    bits = x.abs().to(torch.float32).view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    return (exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)).clamp(1, 254)


def requant_ue8m0(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 `[N, K]` weight with fp32 block scales -> (re-quantised FP8 weight, packed int32 scales)."""
    n, k = weight.shape
    values = dequantize_fp8_block(weight.view(torch.float8_e4m3fn), scale).to(torch.bfloat16)
    blocks, _, _ = _blocked(values)  # [N/128, 128, K/128, 128] bf16, zero-padded
    amax = blocks.abs().to(torch.float32).amax(dim=(1, 3)).clamp(min=UE8M0_AMAX_FLOOR)
    exponent = _ue8m0_exponent(amax / FP8_MAX)  # [N/128, K/128]
    power = (exponent << 23).view(torch.float32)
    # bf16 x fp32 widens to fp32; a power of two's reciprocal is exact, so this is exact before the cast.
    q = (blocks * (1.0 / power)[:, None, :, None]).to(torch.float8_e4m3fn)
    q = q.reshape(blocks.shape[0] * QUANT_BLOCK, blocks.shape[2] * QUANT_BLOCK)[:n, :k].contiguous()
    per_row = exponent.repeat_interleave(QUANT_BLOCK, dim=0)[:n].to(torch.int64)  # [N, K/128]
    groups = packed_ue8m0_scale_shape((n, k))[1]
    padded = torch.zeros((n, groups * UE8M0_PER_INT32), dtype=torch.int64)
    padded[:, : per_row.shape[1]] = per_row
    quads = padded.view(n, groups, UE8M0_PER_INT32)
    packed = quads[..., 0] | (quads[..., 1] << 8) | (quads[..., 2] << 16) | (quads[..., 3] << 24)
    return q, (packed - ((packed >> 31) << 32)).to(torch.int32)  # two's complement into int32


def unpack_ue8m0_scale(packed: torch.Tensor, weight_shape: tuple[int, int]) -> torch.Tensor:
    """fp32 block scales `[ceil(N/128), ceil(K/128)]` from packed UE8M0 int32 scales (one row per block)."""
    n, k = weight_shape
    kb = -(-k // QUANT_BLOCK)
    as_bytes = packed.contiguous().view(torch.uint8).view(n, -1)[:, :kb].to(torch.int32)  # little-endian bytes
    per_block = as_bytes[::QUANT_BLOCK]
    return (per_block << 23).view(torch.float32)


def fp8_nan_per_item(weight: torch.Tensor) -> torch.Tensor:
    """For uint8 storage of e4m3fn weights `[n, ...]`: which of the n hold a NaN.

    e4m3fn has no infinities; 0x7F and 0xFF are its only NaN encodings. Two max-reductions rule
    them out first (0xFF is the only byte whose uint8 value is 255, 0x7F the only one whose int8 value
    is 127): about thirty times faster than comparing every byte, and the usual answer."""
    if int(weight.max()) != 255 and int(weight.view(torch.int8).max()) != 127:
        return torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    return ((weight & 0x7F) == 0x7F).reshape(weight.shape[0], -1).any(dim=1)

