"""Choosing a backend: `--kernel auto|reference|triton|cutlass|trtllm`.

`auto` takes the best one this machine can run, in this order: FlashInfer's TRT-LLM-gen routed
kernel (the serving kernel itself; Blackwell), FlashInfer's CUTLASS MoE (SM90, only with a cached
build, sglang profile), our Triton kernel (any FP8-capable CUDA GPU), the torch reference. The
report says which ran and why the better ones did not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_convert.transform.profiles import KernelFlags
from mm_convert.validators.kernels.base import Backend
from mm_convert.validators.kernels.reference import ReferenceBackend


@dataclass(frozen=True)
class Selection:
    backend: Backend | None
    note: str  # which ran and why, or why none could


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _unavailable(kernel: str, flags: KernelFlags, explicit: bool) -> str | None:
    if kernel == "triton":
        try:
            from mm_convert.validators.kernels import triton_moe
        except ImportError as exc:
            return f"Triton is not importable ({exc})"
        return triton_moe.unavailable_reason(allow_interpreter=explicit)
    from mm_convert.validators.kernels import flashinfer_moe

    if kernel == "trtllm":
        return flashinfer_moe.trtllm_unavailable_reason()
    return flashinfer_moe.cutlass_unavailable_reason(flags.weight_layout, flags.use_shuffled_weight)


def _make(kernel: str, device: str) -> Backend:
    if kernel == "triton":
        from mm_convert.validators.kernels.triton_moe import TritonBackend, interpreting

        return TritonBackend(device if interpreting() else "cuda")
    from mm_convert.validators.kernels.flashinfer_moe import CutlassBackend, TrtllmBackend

    return TrtllmBackend("cuda") if kernel == "trtllm" else CutlassBackend("cuda")


def select(kernel: str, flags: KernelFlags, device: str | None = None) -> Selection:
    device = device or default_device()
    if kernel == "reference":
        return Selection(ReferenceBackend(device), f"torch float32 on {device}")
    if kernel != "auto":
        reason = _unavailable(kernel, flags, explicit=True)
        if reason is not None:
            return Selection(None, f"{kernel} skipped: {reason}")
        return Selection(_make(kernel, device), f"{kernel} requested")
    skipped = []
    for candidate in ("trtllm", "cutlass", "triton"):
        reason = _unavailable(candidate, flags, explicit=False)
        if reason is None:
            return Selection(_make(candidate, device), "auto: " + "; ".join(skipped + [f"{candidate} runs"]))
        skipped.append(f"{candidate} skipped ({reason})")
    return Selection(ReferenceBackend(device), "auto: " + "; ".join(skipped + [f"reference runs on {device}"]))
