"""Reading the source experts of one layer, a chunk of experts at a time, ready for a profile.

FP8 sources come back as raw bytes with their scales; BF16 (or F16/F32) sources are block
quantised here. Values are checked on the way: FP8 NaN encodings, non-finite or non-positive
scales, non-finite floats, each refused naming the file and tensor.
"""

from __future__ import annotations

import torch

from convert import model
from convert.errors import ConvertError
from convert.profiles import Down, GateUp
from convert.quant import quantize_fp8_block
from convert.source import SourceCheckpoint


def _check_fp8(t: torch.Tensor, names: list[str], source: SourceCheckpoint) -> None:
    # e4m3fn has no infinities; 0x7F and 0xFF are its only NaN encodings.
    bad = (t & 0x7F) == 0x7F
    if bool(bad.any()):
        i = int(bad.flatten(1).any(1).nonzero()[0])
        raise ConvertError(f"{source.info(names[i]).path}: tensor {names[i]}: FP8 weight holds NaN")


def _check_float(t: torch.Tensor, names: list[str], source: SourceCheckpoint, what: str, positive: bool) -> None:
    bad = ~torch.isfinite(t)
    if positive:
        bad |= t <= 0
    if bool(bad.any()):
        i = int(bad.flatten(1).any(1).nonzero()[0])
        problem = "non-finite or non-positive values" if positive else "NaN or Inf"
        raise ConvertError(f"{source.info(names[i]).path}: tensor {names[i]}: {what} holds {problem}")


def _read_stack(source: SourceCheckpoint, names: list[str], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((len(names), *shape), dtype=dtype)
    for i, name in enumerate(names):
        source.read_into(name, out[i])
    return out


def read_projection(source: SourceCheckpoint, layer: int, experts: range, proj: model.Projection
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One projection of a chunk of experts as stored: (weights `[n, rows, cols]`, scales or None).

    FP8 weights come back as raw bytes (uint8) with their fp32 scales; other dtypes as they are.
    """
    wshape = source.shape.expert_weight_shapes[proj]
    wnames = [model.expert_weight_name(layer, e, proj) for e in experts]
    if source.kind == "fp8":
        snames = [model.expert_scale_name(layer, e, proj) for e in experts]
        weight = _read_stack(source, wnames, wshape, torch.uint8)
        scale = _read_stack(source, snames, model.scale_shape(wshape), torch.float32)
        _check_fp8(weight, wnames, source)
        _check_float(scale, snames, source, "scale", positive=True)
        return weight, scale
    raw = _read_stack(source, wnames, wshape, source.info(wnames[0]).torch_dtype)
    _check_float(raw, wnames, source, "weight", positive=False)
    return raw, None


def _load_projection(source: SourceCheckpoint, layer: int, experts: range, proj: model.Projection, device: str):
    """(fp8 bytes `[n, rows, cols]`, fp32 scales) for one projection of a chunk of experts."""
    weight, scale = read_projection(source, layer, experts, proj)
    if scale is not None:
        return weight.to(device), scale.to(device)
    q, scale = quantize_fp8_block(weight.to(device))
    return q.view(torch.uint8), scale


def load_gate_up(source: SourceCheckpoint, layer: int, experts: range, device: str = "cpu") -> GateUp:
    gate, gate_scale = _load_projection(source, layer, experts, "w1", device)
    up, up_scale = _load_projection(source, layer, experts, "w3", device)
    return GateUp(gate=gate, up=up, gate_scale=gate_scale, up_scale=up_scale)


def load_down(source: SourceCheckpoint, layer: int, experts: range, device: str = "cpu") -> Down:
    weight, scale = _load_projection(source, layer, experts, "w2", device)
    return Down(weight=weight, scale=scale)
