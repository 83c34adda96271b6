"""Reading the source experts of one layer, a chunk of experts at a time, ready for a profile.

Split in the two halves the conversion pipeline runs on different threads: `read_raw` (I/O only:
the stored bytes, into caller-provided buffers) and `ready` (checks and, for BF16 sources, block
quantisation). Values are checked on the way: FP8 NaN encodings, non-finite or non-positive
scales, non-finite floats, each refused naming the file and tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm_convert import model
from mm_convert.errors import SourceError
from mm_convert.transform.profiles import Down, GateUp
from mm_convert.transform.quant import fp8_nan_per_item, quantize_fp8_block
from mm_convert.read.source import SourceCheckpoint

GATE_UP: tuple[model.Projection, ...] = ("w1", "w3")
DOWN: tuple[model.Projection, ...] = ("w2",)


@dataclass
class Raw:
    """One projection of a chunk of experts exactly as stored (FP8 as bytes) plus its scales."""

    proj: model.Projection
    weight: torch.Tensor  # [n, rows, cols]
    scale: torch.Tensor | None  # FP8 sources only


def _names(layer: int, experts: range, proj: model.Projection, scale: bool) -> list[str]:
    name = model.expert_scale_name if scale else model.expert_weight_name
    return [name(layer, e, proj) for e in experts]


def _fail(source: SourceCheckpoint, bad_per_expert: torch.Tensor, names: list[str], problem: str) -> None:
    i = int(bad_per_expert.nonzero()[0])
    raise SourceError(f"{source.info(names[i]).path}: tensor {names[i]}: {problem}")


def check_fp8(source: SourceCheckpoint, weight: torch.Tensor, names: list[str]) -> None:
    bad = fp8_nan_per_item(weight)
    if bool(bad.any()):
        _fail(source, bad, names, "FP8 weight holds NaN")


def check_scales(source: SourceCheckpoint, scale: torch.Tensor, names: list[str], what: str) -> None:
    bad = (~torch.isfinite(scale) | (scale <= 0) | (scale > model.FP8_MAX_SCALE)).flatten(1).any(1)
    if bool(bad.any()):
        _fail(source, bad, names, f"{what} holds non-finite, non-positive or overflowing values "
                                  f"(448 x scale must stay below float32's maximum: scale <= {model.FP8_MAX_SCALE:.3g})")


def read_raw(source: SourceCheckpoint, layer: int, experts: range, proj: model.Projection,
             weight_out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None) -> Raw:
    """The stored bytes of one projection of a chunk of experts (into the given buffers if any)."""
    wshape = source.shape.expert_weight_shapes[proj]
    dtype = torch.uint8 if source.kind == "fp8" else source.info(model.expert_weight_name(layer, experts.start, proj)).torch_dtype
    weight = weight_out if weight_out is not None else torch.empty((len(experts), *wshape), dtype=dtype)
    for i, name in enumerate(_names(layer, experts, proj, scale=False)):
        source.read_into(name, weight[i])
    scale = None
    if source.kind == "fp8":
        sshape = model.scale_shape(wshape)
        scale = scale_out if scale_out is not None else torch.empty((len(experts), *sshape), dtype=torch.float32)
        for i, name in enumerate(_names(layer, experts, proj, scale=True)):
            source.read_into(name, scale[i])
    return Raw(proj, weight, scale)


def ready(source: SourceCheckpoint, layer: int, experts: range, raw: Raw, device: str = "cpu",
          scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked FP8 bytes and fp32 scales of a projection: FP8 as stored, BF16 block-quantised (into
    the reusable `scratch` and `out` buffers when given)."""
    if raw.scale is not None:
        check_fp8(source, raw.weight, _names(layer, experts, raw.proj, scale=False))
        check_scales(source, raw.scale, _names(layer, experts, raw.proj, scale=True), "scale")
        return raw.weight.to(device), raw.scale.to(device)
    q, scale = quantize_fp8_block(raw.weight.to(device), scratch, out)
    # A NaN or Inf anywhere in a block makes its amax, and so its scale, non-finite.
    bad = (~torch.isfinite(scale)).flatten(1).any(1)
    if bool(bad.any()):
        _fail(source, bad.cpu(), _names(layer, experts, raw.proj, scale=False), "weight holds NaN or Inf")
    return q.view(torch.uint8), scale


def load_gate_up(source: SourceCheckpoint, layer: int, experts: range, device: str = "cpu") -> GateUp:
    gate, gate_scale = ready(source, layer, experts, read_raw(source, layer, experts, "w1"), device)
    up, up_scale = ready(source, layer, experts, read_raw(source, layer, experts, "w3"), device)
    return GateUp(gate=gate, up=up, gate_scale=gate_scale, up_scale=up_scale)


def load_down(source: SourceCheckpoint, layer: int, experts: range, device: str = "cpu") -> Down:
    weight, scale = ready(source, layer, experts, read_raw(source, layer, experts, "w2"), device)
    return Down(weight=weight, scale=scale)


def read_projection(source: SourceCheckpoint, layer: int, experts: range, proj: model.Projection
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checked stored values of one projection: (weights `[n, rows, cols]`, scales or None).

    FP8 weights come back as raw bytes (uint8) with their fp32 scales; other dtypes as they are
    (the validators quantise those themselves)."""
    raw = read_raw(source, layer, experts, proj)
    names = _names(layer, experts, proj, scale=False)
    if raw.scale is not None:
        check_fp8(source, raw.weight, names)
        check_scales(source, raw.scale, _names(layer, experts, proj, scale=True), "scale")
    else:
        bad = (~torch.isfinite(raw.weight)).flatten(1).any(1)
        if bool(bad.any()):
            _fail(source, bad, names, "weight holds NaN or Inf")
    return raw.weight, raw.scale
