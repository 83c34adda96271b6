"""FlashInfer's own MoE kernels as backends (flashinfer-python 0.6.13's API; docs/VERIFIED.md).

- `trtllm`: `trtllm_fp8_block_scale_routed_moe`, the kernel the checkpoint is laid out for, called
  with the arguments SGLang's `flashinfer_trtllm_routed` backend passes (packed top-k, DeepSeek FP8
  activations with `[H/128, T]` scales, `routing_method_type` TopK, `routed_scaling_factor` 1.0,
  `intermediate_size` = I_p, the profile's `use_shuffled_weight` / `weight_layout`). TRT-LLM-gen
  kernels exist only for Blackwell (SM100/SM103) and load prebuilt cubins: offline they need the
  `flashinfer-cubin` package of the same version.
- `cutlass`: `cutlass_fused_moe(..., use_deepseek_fp8_block_scale=True)`, SM90 only, fed the
  `sglang` profile's unshuffled `[w3; w1]` tensors. Its JIT module (`fused_moe_90`) takes about an
  hour to build on 16 cores, so it is used only when that build is already cached.

Availability is decided without importing anything heavy and without triggering a download or a
build; the reason a backend cannot run is reported, never hidden.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch

from mm_convert.transform.profiles import WEIGHT_LAYOUT_MAJOR_K
from mm_convert.validators.kernels.base import RankWeights, RoutedInputs
from mm_convert.validators.numerics import FP8_KERNEL
from mm_convert.validators.routing import unpack_topk

ROUTING_METHOD_TOPK = 5  # flashinfer.RoutingMethodType.TopK: what SGLang passes for pre-routed tokens
CUTLASS_MODULE = "fused_moe_90"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> tuple[int, int, str] | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major, minor, torch.cuda.get_device_name()


def trtllm_unavailable_reason() -> str | None:
    fi = _version("flashinfer-python")
    if fi is None:
        return "flashinfer-python is not installed"
    gpu = _gpu()
    if gpu is None:
        return "needs a Blackwell GPU (SM100/SM103); no CUDA GPU here"
    major, minor, name = gpu
    if major != 10:
        return f"TRT-LLM-gen kernels need Blackwell (SM100/SM103); this GPU is SM{major}{minor} ({name})"
    cubin = _version("flashinfer-cubin")
    if cubin is None and not os.environ.get("FLASHINFER_CUBIN_DIR"):
        return (f"needs flashinfer-cubin=={fi} (or FLASHINFER_CUBIN_DIR) for its prebuilt kernels; "
                "without it FlashInfer tries to download them")
    if cubin is not None and cubin != fi:
        return f"flashinfer-cubin {cubin} does not match flashinfer-python {fi}: pin both to the same version"
    return None


def cutlass_library_paths() -> list[Path]:
    """Where FlashInfer keeps a built `fused_moe_90` (JIT cache, then AOT), read without building."""
    from flashinfer.jit import env  # light: paths only

    paths = []
    for root in (getattr(env, "FLASHINFER_JIT_DIR", None), getattr(env, "FLASHINFER_AOT_DIR", None)):
        if root is not None:
            paths.append(Path(root) / CUTLASS_MODULE / f"{CUTLASS_MODULE}.so")
    return paths


def cutlass_unavailable_reason(profile_layout: int | None = None, shuffled: bool | None = None) -> str | None:
    if _version("flashinfer-python") is None:
        return "flashinfer-python is not installed"
    gpu = _gpu()
    if gpu is None:
        return "needs an SM90 GPU (Hopper); no CUDA GPU here"
    major, minor, name = gpu
    if (major, minor) != (9, 0):
        return f"FlashInfer's FP8 block-scale CUTLASS MoE is SM90 only; this GPU is SM{major}{minor} ({name})"
    if shuffled or (profile_layout is not None and profile_layout != WEIGHT_LAYOUT_MAJOR_K):
        return "cutlass takes the sglang profile's unshuffled MajorK tensors, not the trtllm layout"
    built = [p for p in cutlass_library_paths() if p.exists()]
    if not built:
        where = ", ".join(str(p) for p in cutlass_library_paths()) or "FlashInfer's cache"
        return f"its JIT module {CUTLASS_MODULE} is not built (about an hour on 16 cores); no build at {where}"
    return None


class TrtllmBackend:
    name = "trtllm"
    tolerance = FP8_KERNEL

    def __init__(self, device: str = "cuda"):
        self.device = device

    def run(self, inputs: RoutedInputs, w: RankWeights, out: torch.Tensor) -> None:
        from flashinfer.fused_moe import trtllm_fp8_block_scale_routed_moe

        t = inputs.hidden_fp8.shape[0]
        result = torch.empty(inputs.hidden_fp8.shape, dtype=torch.bfloat16, device=out.device)
        result.fill_(float("nan"))
        trtllm_fp8_block_scale_routed_moe(
            topk_ids=inputs.topk_packed,
            routing_bias=None,
            hidden_states=inputs.hidden_fp8,
            hidden_states_scale=inputs.hidden_scale,
            gemm1_weights=w.w13,
            gemm1_weights_scale=w.w13_scale,
            gemm2_weights=w.w2,
            gemm2_weights_scale=w.w2_scale,
            num_experts=inputs.num_experts,
            top_k=inputs.top_k,
            n_group=None,
            topk_group=None,
            intermediate_size=w.padded_intermediate_size,
            local_expert_offset=w.local_expert_offset,
            local_num_experts=w.local_num_experts,
            routed_scaling_factor=1.0,
            routing_method_type=ROUTING_METHOD_TOPK,
            use_shuffled_weight=w.use_shuffled_weight,
            weight_layout=w.weight_layout,
            output=result,
            tune_max_num_tokens=max(8, 1 << (t - 1).bit_length()),
        )
        out.copy_(result.float())


class CutlassBackend:
    name = "cutlass"
    tolerance = FP8_KERNEL

    def __init__(self, device: str = "cuda"):
        self.device = device

    def run(self, inputs: RoutedInputs, w: RankWeights, out: torch.Tensor) -> None:
        from flashinfer.fused_moe import cutlass_fused_moe

        ids, weights = unpack_topk(inputs.topk_packed)
        ep_size = inputs.num_experts // w.local_num_experts
        # cutlass quantises bf16 activations itself (1x128 blocks); give it the FP8 inputs, dequantised.
        hidden = inputs.dequantized_hidden().to(torch.bfloat16)
        result = torch.full(hidden.shape, float("nan"), dtype=torch.bfloat16, device=out.device)
        cutlass_fused_moe(
            hidden,
            ids.to(torch.int32).contiguous(),
            weights.float().contiguous(),
            w.w13,
            w.w2,
            torch.bfloat16,
            quant_scales=[w.w13_scale.contiguous(), w.w2_scale.contiguous()],
            ep_size=ep_size,
            ep_rank=w.local_expert_offset // w.local_num_experts,
            use_deepseek_fp8_block_scale=True,
            output=result,
        )
        out.copy_(result.float())
