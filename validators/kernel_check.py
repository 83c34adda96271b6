"""The kernel check: seeded hidden states through selected layers, routed with the checkpoint's own
gate and correction bias, run rank by rank through a backend on the kernel-ready tensors, combined
as the serving engine would (summed over all ranks: MoE-TP ranks hold row slices, EP ranks hold
expert blocks), and compared with a float32 reference computed from the source weights."""

from __future__ import annotations

import time
from typing import Callable

import torch

from mm_convert import model
from mm_convert.errors import CheckFailed, MMConvertError
from mm_convert.output_format import ShapeEntry
from mm_convert.transform.profiles import Packed
from mm_convert.transform.quant import (
    dequantize_fp8_block,
    quantize_fp8_block,
    quantize_fp8_per_token_group,
)
from mm_convert.read.source import SourceCheckpoint
from mm_convert.validators import numerics
from mm_convert.validators.checkpoint import ConvertedCheckpoint
from mm_convert.validators.kernels.base import Backend, RankWeights, RoutedInputs
from mm_convert.validators.report import Finding, Report
from mm_convert.validators.routing import Routing, route, unpack_topk

CHECK = "kernel"
ExpertWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # e -> fp32 (w1, w3, w2)


def default_layers(num_layers: int) -> list[int]:
    """A spread including the first and the last layer."""
    return sorted({0, num_layers // 2, num_layers - 1})


def make_inputs(hidden: torch.Tensor, routing: Routing, num_experts: int) -> RoutedInputs:
    q, scale = quantize_fp8_per_token_group(hidden)
    return RoutedInputs(q, scale.t().contiguous(), routing.packed, num_experts, routing.ids.shape[1])


def hidden_states(tokens: int, hidden: int, seed: int, layer: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(tokens, hidden, generator=gen)


def source_reference(inputs: RoutedInputs, experts: ExpertWeights, device: str = "cpu",
                     rows: Callable[[int], list[tuple[int, int]]] | None = None) -> torch.Tensor:
    """float32 MoE over the unsliced, unpadded expert matrices, same FP8 activations.

    `rows(e)` limits expert `e` to intermediate rows `[start, stop)` (the slices of the ranks in a
    folder that holds only some ranks: MoE-TP ranks add up exactly, row slice by row slice); an
    expert with no rows contributes nothing."""
    x = inputs.dequantized_hidden().to(device)
    ids, weights = unpack_topk(inputs.topk_packed.to(device))
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        w1, w3, w2 = (m.to(device) for m in experts(e))
        for start, stop in (rows(e) if rows is not None else [(0, w1.shape[0])]):
            act = torch.nn.functional.silu(x[tok] @ w1[start:stop].t()) * (x[tok] @ w3[start:stop].t())
            out.index_add_(0, tok, (act @ w2[:, start:stop].t()) * weights[tok, slot, None])
    return out.cpu()


def present_rows(ckpt: ConvertedCheckpoint, entry: ShapeEntry) -> Callable[[int], list[tuple[int, int]]] | None:
    """For a folder holding some ranks only: the intermediate rows of each expert those ranks hold."""
    if entry.ranks is None:
        return None
    ranks = ckpt.ranks(entry)

    def rows(e: int) -> list[tuple[int, int]]:
        return [(g.row_start, g.row_start + g.real_rows) for g in ranks if e in g.experts and g.real_rows]

    return rows


def source_experts(source: SourceCheckpoint, layer: int, device: str = "cpu", quantised: bool = True) -> ExpertWeights:
    """The FP8 weights the kernel should be running, from the source (BF16 sources quantised here);
    `quantised=False`: a BF16 source's own weights, for what quantisation costs at the output."""

    def get(e: int):
        mats = []
        for proj in ("w1", "w3", "w2"):
            w = source.read(model.expert_weight_name(layer, e, proj)).to(device)
            if not quantised and source.kind != "fp8":
                mats.append(w.float())
                continue
            if source.kind == "fp8":
                s = source.read(model.expert_scale_name(layer, e, proj)).to(device)
            else:
                w, s = quantize_fp8_block(w)
            mats.append(dequantize_fp8_block(w, s))
        return tuple(mats)

    return get


def checkpoint_experts(ckpt: ConvertedCheckpoint, entry: ShapeEntry, layer: int,
                       only_ranks: frozenset[int] | None = None) -> ExpertWeights:
    """Without --source: the experts rebuilt from the output itself, each rank's rows in place (rows
    of ranks a partial folder does not hold stay zero; `present_rows` leaves them out).
    `only_ranks`: read those ranks' files only (the distributed check: each process its own)."""
    ranks = [g for g in ckpt.ranks(entry) if only_ranks is None or g.rank in only_ranks]
    m = ckpt.shape

    def get(e: int):
        w1, w3 = torch.zeros(m.intermediate_size, m.hidden_size), torch.zeros(m.intermediate_size, m.hidden_size)
        w2 = torch.zeros(m.hidden_size, m.intermediate_size)
        for g in (g for g in ranks if e in g.experts and g.real_rows):
            local = range(e - g.first_expert, e - g.first_expert + 1)
            t = ckpt.rank_layer(entry, g.rank, layer, local)
            gu = ckpt.profile.unpack_gate_up(Packed(t.w13, t.w13_scale), g)
            dn = ckpt.profile.unpack_down(Packed(t.w2, t.w2_scale), g)
            rows = slice(g.row_start, g.row_start + g.real_rows)
            deq = lambda w, s: dequantize_fp8_block(w[0].view(torch.float8_e4m3fn), s[0])  # noqa: E731
            # A slice's own scale blocks start at its first row, which is a multiple of 128.
            w1[rows], w3[rows], w2[:, rows] = deq(gu.gate, gu.gate_scale), deq(gu.up, gu.up_scale), deq(dn.weight, dn.scale)
        return w1, w3, w2

    return get


def rank_weights(ckpt: ConvertedCheckpoint, entry: ShapeEntry, rank: int, layer: int) -> RankWeights:
    g = entry.parallel.rank(ckpt.shape, rank)
    t = ckpt.rank_layer(entry, rank, layer)
    flags = ckpt.profile.flags
    return RankWeights(t.w13, t.w13_scale, t.w2, t.w2_scale, flags.use_shuffled_weight, flags.weight_layout,
                       g.first_expert, g.num_local_experts, g.padded_intermediate_size, ckpt.shape.hidden_size)


def run_layer(ckpt: ConvertedCheckpoint, entry: ShapeEntry, layer: int, backend: Backend,
              inputs: RoutedInputs) -> torch.Tensor:
    """Every rank through the backend, outputs poisoned with NaN first so unwritten elements show."""
    device_inputs = inputs.to(backend.device)
    total = torch.zeros(inputs.hidden_fp8.shape, dtype=torch.float32)
    for g in ckpt.ranks(entry):
        weights = rank_weights(ckpt, entry, g.rank, layer).to(backend.device)
        out = torch.full(inputs.hidden_fp8.shape, float("nan"), dtype=torch.float32, device=backend.device)
        backend.run(device_inputs, weights, out)
        total += out.float().cpu()
    return total


def run(ckpt: ConvertedCheckpoint, source: SourceCheckpoint | None, report: Report, backend: Backend,
        layers: list[int], tokens: int, seed: int, broken_shapes: frozenset[str] = frozenset()) -> None:
    for layer in layers:
        if not 0 <= layer < ckpt.shape.num_layers:
            raise CheckFailed(f"--layers: layer {layer} does not exist (the model has {ckpt.shape.num_layers})")
    for entry in ckpt.block.shapes:
        label = entry.key
        if label in broken_shapes:
            report.add(Finding(CHECK, "skip", "not run: the structure check failed for this shape", shape=label))
            continue
        for layer in layers:
            started = time.monotonic()
            gate, bias = ckpt.router(entry, layer)
            hidden = hidden_states(tokens, ckpt.shape.hidden_size, seed, layer)
            inputs = make_inputs(hidden, route(hidden, gate, bias, ckpt.shape.top_k), ckpt.shape.num_experts)
            try:
                out = run_layer(ckpt, entry, layer, backend, inputs)
            except (MMConvertError, RuntimeError, ValueError) as exc:
                report.add(Finding(CHECK, "fail", f"cannot run: {exc}", shape=label, layer=layer))
                continue
            kernel_seconds = time.monotonic() - started
            experts = (source_experts(source, layer, backend.device) if source is not None
                       else checkpoint_experts(ckpt, entry, layer))
            reference = source_reference(inputs, experts, backend.device, present_rows(ckpt, entry))
            unquantised = None
            if source is not None and source.kind != "fp8":
                unquantised = source_reference(inputs, source_experts(source, layer, backend.device, quantised=False),
                                               backend.device, present_rows(ckpt, entry))
            report.add(judge(out, reference, unquantised, backend, entry, layer, kernel_seconds,
                             f"on {len(entry.present_ranks)} ranks", source is not None))


def judge(out: torch.Tensor, reference: torch.Tensor, unquantised: torch.Tensor | None, backend: Backend,
          entry: ShapeEntry, layer: int, seconds: float, where: str, from_source: bool) -> Finding:
    """One layer's summed MoE output against the float32 reference: the finding, with its metrics.
    `unquantised` (BF16 sources): the reference on the source's own weights, for the card's error
    column, not a pass criterion."""
    metrics = numerics.compare_outputs(out, reference)
    metrics["seconds"] = round(seconds, 3)
    if unquantised is not None:
        vs_source = numerics.compare_outputs(out, unquantised)
        metrics.update(vs_source_rel_l2=vs_source["rel_l2"], vs_source_cosine=vs_source["cosine"])
    ok = numerics.passes(metrics, backend.tolerance)
    unwritten = int(torch.isnan(out).sum())
    message = (f"{backend.name} {where} vs float32 reference from the "
               f"{'source' if from_source else 'checkpoint itself'}: rel_l2 {metrics['rel_l2']:.2e}, "
               f"cosine {metrics['cosine']:.6f}, within FlashInfer tolerance {metrics['within_tolerance']:.3f}")
    if unwritten:
        message += f"; {unwritten} output elements never written"
        ok = False
    return Finding(CHECK, "pass" if ok else "fail", message, shape=entry.key, layer=layer, metrics=metrics)
