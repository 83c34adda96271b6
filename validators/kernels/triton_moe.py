"""Our own routed FP8 block-scale MoE in Triton: compiles in seconds, runs on Hopper, Ada, Blackwell.

It takes exactly what the routed TRT-LLM kernel takes for one rank (SPEC section 3): FP8 hidden
states with per-token 1x128 scales laid out `[H/128, T]`, the packed top-k
`(expert << 16) | bf16 weight`, and the rank's stored expert tensors with their 128x128 scales, in
either profile's layout. BlockMajorK and the TRT-LLM row shuffle are undone in the load addresses
(index math), never by copying weights back.

Two grouped GEMM kernels, tokens grouped by expert in blocks of BLOCK_M rows:

1. gemm1 + SwiGLU: for a block of rows and 128 intermediate columns, accumulate the up half
   (rows `[0, I)` of w13) and the gate half (rows `[I, 2I)`) over K blocks of 128 with
   `acc += dot(a_fp8, w_fp8^T) * a_scale * w_scale`, then `silu(gate) * up`, requantised to FP8 with
   one scale per row per 128 columns (as the TRT-LLM kernel does).
2. gemm2: the same over the intermediate, times the routing weight, written to the row's own
   (token, slot) output. The slots of a token are summed afterwards (deterministic, no atomics);
   the result is rounded to bf16 like the TRT-LLM kernel's output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mm_convert.model import QUANT_BLOCK
from mm_convert.transform.profiles import EPILOGUE_TILE_M, SHUFFLE_ROWS, WEIGHT_LAYOUT_BLOCK_MAJOR_K
from mm_convert.validators.kernels.base import RankWeights, RoutedInputs
from mm_convert.validators.numerics import FP8_KERNEL
from mm_convert.validators.routing import unpack_topk

BLOCK_K = QUANT_BLOCK
BLOCK_N = QUANT_BLOCK  # one weight-scale block per program column, one activation scale per row
# The jit code below spells the shuffle's 16-row blocks and epilogue tile 64 as literals (Triton
# compiles constants, not module globals): held to the profile's own values here.
assert SHUFFLE_ROWS == 16 and EPILOGUE_TILE_M == 64


@triton.jit
def _stored_row(rows, SHUFFLED: tl.constexpr):
    """Row of the stored matrix holding source row `rows` (TRT-LLM shuffle, 16-row blocks)."""
    if SHUFFLED:
        within = rows % 16
        return rows - within + within // 2 + 8 * (within % 2)
    return rows


@triton.jit
def _weight_tile(w_ptr, expert, rows, kb, M, K, SHUFFLED: tl.constexpr, BLOCK_MAJOR: tl.constexpr):
    """A [len(rows), 128] FP8 tile of expert `expert`'s [M, K] matrix, K block `kb`, in stored layout."""
    cols = tl.arange(0, 128)
    stored = _stored_row(rows, SHUFFLED).to(tl.int64)
    base = w_ptr + expert.to(tl.int64) * M * K
    if BLOCK_MAJOR:  # [E, K/128, M, 128]
        ptrs = base + kb * M * 128 + stored[:, None] * 128 + cols[None, :]
    else:  # [E, M, K]
        ptrs = base + stored[:, None] * K + kb * 128 + cols[None, :]
    return tl.load(ptrs)


@triton.jit
def _round_e4m3(x):
    """Round fp32 to the nearest e4m3 value (ties to even), saturating: for the interpreter, whose
    own fp32->fp8 cast mis-rounds values that carry into the next binade (Triton 3.6)."""
    ax = tl.minimum(tl.abs(x), 448.0)
    e = tl.floor(tl.log2(tl.maximum(ax, 0.015625)))  # subnormals share the 2^-6 exponent
    ulp = tl.exp2(e - 3.0)
    v = ax / ulp
    r = tl.floor(v + 0.5)
    tie_odd = ((r - v) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
    r = tl.where(tie_odd, r - 1.0, r)
    return tl.where(x < 0, -r * ulp, r * ulp)


@triton.jit
def _gemm1_swiglu(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, rows_ptr, block_expert_ptr, act_ptr, act_scale_ptr,
    T, top_k, num_rows_padded, H: tl.constexpr, I: tl.constexpr, H_BLOCKS: tl.constexpr, I_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, SHUFFLED: tl.constexpr, BLOCK_MAJOR: tl.constexpr, EMULATE_CAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(rows_ptr + offs_m)  # token * top_k + slot, or -1 for padding
    valid = flat >= 0
    tok = tl.where(valid, flat // top_k, 0).to(tl.int64)
    cols = tl.arange(0, 128)
    up_rows = pid_n * 128 + tl.arange(0, 128)
    gate_rows = I + up_rows
    M = 2 * I
    acc_up = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    # Loop bounds are constexpr arguments: Triton's interpreter cannot range() over a computed value.
    for kb in range(0, H_BLOCKS):
        a = tl.load(a_ptr + tok[:, None] * H + kb * 128 + cols[None, :], mask=valid[:, None], other=0.0)
        a_s = tl.load(a_scale_ptr + kb * T + tok, mask=valid, other=0.0)
        b_up = _weight_tile(w_ptr, expert, up_rows, kb, M, H, SHUFFLED, BLOCK_MAJOR)
        b_gate = _weight_tile(w_ptr, expert, gate_rows, kb, M, H, SHUFFLED, BLOCK_MAJOR)
        s_base = w_scale_ptr + expert.to(tl.int64) * (2 * I_BLOCKS) * H_BLOCKS
        s_up = tl.load(s_base + pid_n * H_BLOCKS + kb)
        s_gate = tl.load(s_base + (I_BLOCKS + pid_n) * H_BLOCKS + kb)
        acc_up += tl.dot(a, tl.trans(b_up)) * (a_s[:, None] * s_up)
        acc_gate += tl.dot(a, tl.trans(b_gate)) * (a_s[:, None] * s_gate)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up
    # 448.0: e4m3's largest finite value (mm_convert.model.FP8_MAX), as a literal for the compiler.
    amax = tl.max(tl.abs(act), axis=1)
    scale = tl.where(amax > 0, amax / 448.0, 1.0)
    scaled = act / scale[:, None]
    if EMULATE_CAST:
        scaled = _round_e4m3(scaled)
    q = scaled.to(tl.float8e4nv)
    out_rows = offs_m.to(tl.int64)
    tl.store(act_ptr + out_rows[:, None] * I + pid_n * 128 + cols[None, :], q)
    tl.store(act_scale_ptr + pid_n * num_rows_padded + out_rows, scale)


@triton.jit
def _gemm2_weighted(
    act_ptr, act_scale_ptr, w_ptr, w_scale_ptr, rows_ptr, block_expert_ptr, weight_ptr, out_ptr,
    num_rows_padded, H: tl.constexpr, I: tl.constexpr, H_BLOCKS: tl.constexpr, I_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, SHUFFLED: tl.constexpr, BLOCK_MAJOR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    flat = tl.load(rows_ptr + offs_m)
    valid = flat >= 0
    cols = tl.arange(0, 128)
    out_cols = pid_n * 128 + tl.arange(0, 128)
    rows64 = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    for kb in range(0, I_BLOCKS):
        a = tl.load(act_ptr + rows64[:, None] * I + kb * 128 + cols[None, :])
        a_s = tl.load(act_scale_ptr + kb * num_rows_padded + rows64)
        b = _weight_tile(w_ptr, expert, out_cols, kb, H, I, SHUFFLED, BLOCK_MAJOR)
        s = tl.load(w_scale_ptr + expert.to(tl.int64) * H_BLOCKS * I_BLOCKS + pid_n * I_BLOCKS + kb)
        acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * s)
    w = tl.load(weight_ptr + flat, mask=valid, other=0.0)
    dst = tl.where(valid, flat, 0).to(tl.int64)
    tl.store(out_ptr + dst[:, None] * H + out_cols[None, :], acc * w[:, None], mask=valid[:, None])


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(tokens_times_k: int, local_experts: int) -> tuple[int, int, int]:
    """(rows per block, warps, pipeline stages), from a sweep on an H200 (docs/PERF.md):
    16-row blocks while each expert sees few tokens (decode), 64-row blocks with 8 warps and 4
    stages beyond that (1.29 ms against 1.41 ms with 4 warps at 8192 tokens, TP4 rank)."""
    per_expert = tokens_times_k / max(1, local_experts)
    return (16, 4, 3) if per_expert <= 16 else (64, 8, 4)


def group_by_expert(local_ids: torch.Tensor, local_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (token * top_k + slot) sorted by local expert, each expert padded to whole blocks.

    Returns (rows `[blocks * block_m]` with -1 padding, expert of each block `[blocks]`).
    """
    flat = local_ids.flatten()
    valid = (flat >= 0) & (flat < local_experts)
    row_ids = valid.nonzero().flatten()
    experts = flat[row_ids]
    order = torch.argsort(experts, stable=True)
    row_ids, experts = row_ids[order], experts[order]
    counts = torch.bincount(experts, minlength=local_experts)
    blocks = (counts + block_m - 1) // block_m
    padded_start = torch.cumsum(blocks * block_m, 0) - blocks * block_m
    start = torch.cumsum(counts, 0) - counts
    position = padded_start[experts] + torch.arange(experts.numel(), device=flat.device) - start[experts]
    total = int(blocks.sum()) * block_m
    rows = torch.full((total,), -1, dtype=torch.int32, device=flat.device)
    rows[position] = row_ids.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(local_experts, device=flat.device, dtype=torch.int32), blocks)
    return rows, block_expert


@dataclass
class Launch:
    """Everything one rank's two kernel launches need, prepared on the host side once."""

    rows: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    num_warps: int
    num_stages: int
    weights: torch.Tensor  # routing weight per (token, slot) row
    slots: torch.Tensor  # [T * k, H] fp32 output per row, NaN-poisoned where a local row belongs
    act: torch.Tensor
    act_scale: torch.Tensor


class TritonBackend:
    name = "triton"
    tolerance = FP8_KERNEL

    def __init__(self, device: str = "cuda", block_m: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None):
        self.device = device
        # None: chosen by launch_config from the tokens per expert.
        self.block_m, self.num_warps, self.num_stages = block_m, num_warps, num_stages

    def prepare(self, inputs: RoutedInputs, w: RankWeights) -> Launch:
        t, h = inputs.hidden_fp8.shape
        k = inputs.top_k
        ids, weights = unpack_topk(inputs.topk_packed)
        local = ids - w.local_expert_offset
        local = torch.where((local >= 0) & (local < w.local_num_experts), local, -1)
        block_m, warps, stages = launch_config(t * k, w.local_num_experts)
        block_m = self.block_m or block_m
        rows, block_expert = group_by_expert(local, w.local_num_experts, block_m)
        device = inputs.hidden_fp8.device
        # Poisoned: a local row the kernel never writes stays NaN; other ranks' rows are zero.
        slots = torch.full((t * k, h), float("nan"), dtype=torch.float32, device=device)
        slots[local.flatten() < 0] = 0.0
        ip = w.padded_intermediate_size
        act = torch.empty((rows.numel(), ip), dtype=torch.float8_e4m3fn, device=device)
        act_scale = torch.empty((ip // BLOCK_N, rows.numel()), dtype=torch.float32, device=device)
        return Launch(rows, block_expert, block_m, self.num_warps or warps, self.num_stages or stages,
                      weights.flatten().contiguous(), slots, act, act_scale)

    def launch(self, inputs: RoutedInputs, w: RankWeights, p: Launch) -> None:
        """The two kernels alone (what the performance figures time)."""
        num_blocks = p.block_expert.numel()
        if num_blocks == 0:
            return
        t, h = inputs.hidden_fp8.shape
        ip = w.padded_intermediate_size
        padded = p.rows.numel()
        shuffled = bool(w.use_shuffled_weight)
        block_major = w.weight_layout == WEIGHT_LAYOUT_BLOCK_MAJOR_K
        dims = dict(H=h, I=ip, H_BLOCKS=h // BLOCK_K, I_BLOCKS=ip // BLOCK_K, BLOCK_M=p.block_m,
                    SHUFFLED=shuffled, BLOCK_MAJOR=block_major, num_warps=p.num_warps, num_stages=p.num_stages)
        _gemm1_swiglu[(num_blocks, ip // BLOCK_N)](
            inputs.hidden_fp8, inputs.hidden_scale, w.w13, w.w13_scale, p.rows, p.block_expert, p.act, p.act_scale,
            t, inputs.top_k, padded, EMULATE_CAST=interpreting(), **dims,
        )
        _gemm2_weighted[(num_blocks, h // BLOCK_N)](
            p.act, p.act_scale, w.w2, w.w2_scale, p.rows, p.block_expert, p.weights, p.slots, padded, **dims,
        )

    def run(self, inputs: RoutedInputs, w: RankWeights, out: torch.Tensor) -> None:
        p = self.prepare(inputs, w)
        self.launch(inputs, w, p)
        t, h = inputs.hidden_fp8.shape
        # bf16 output, like the TRT-LLM kernel.
        out.copy_(p.slots.view(t, inputs.top_k, h).sum(dim=1).to(torch.bfloat16).float())


def unavailable_reason(allow_interpreter: bool = True) -> str | None:
    if interpreting():
        return None if allow_interpreter else "TRITON_INTERPRET=1 (the interpreter runs only when asked for)"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none here); its logic is tested on CPU under TRITON_INTERPRET=1"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"needs FP8 tensor cores (SM89 or newer); this GPU is SM{major}{minor}"
    return None

