"""Choosing a backend: `--kernel auto|reference|triton|cutlass|trtllm`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from validators.kernels.base import Backend
from validators.kernels.reference import ReferenceBackend

KERNEL_CHOICES = ("auto", "reference", "triton", "cutlass", "trtllm")


@dataclass(frozen=True)
class Selection:
    backend: Backend | None
    note: str  # which ran and why, or why none could


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def select(kernel: str, device: str | None = None) -> Selection:
    device = device or default_device()
    if kernel == "reference":
        return Selection(ReferenceBackend(device), f"torch float32 on {device}")
    if kernel == "auto":
        return Selection(ReferenceBackend(device), f"auto: reference (torch float32 on {device}); no GPU backend here")
    return Selection(None, f"{kernel}: not available in this build")
