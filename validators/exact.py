"""Exactness against the source: undoing the profile gives back the source bytes (FP8 source) or
the quantised source (BF16 source), tensor by tensor; non-expert tensors and the config unchanged.
For BF16 sources the same pass measures the quantisation error of the dequantised experts."""

from __future__ import annotations

import torch
import xxhash

from mm_convert import model, output_format
from mm_convert.errors import MMConvertError
from mm_convert.output_format import ShapeEntry
from mm_convert.plan.parallel import RankGeometry
from mm_convert.transform.profiles import Down, GateUp, Packed
from mm_convert.transform.quant import dequantize_fp8_block, quantize_fp8_block
from mm_convert.read.read_experts import read_projection
from mm_convert.read.safetensors_file import DTYPES, TensorFile, tensor_bytes
from mm_convert.read.source import SourceCheckpoint
from mm_convert.validators import numerics
from mm_convert.validators.checkpoint import ConvertedCheckpoint
from mm_convert.validators.report import Finding, Report

CHECK = "exact"
QCHECK = "quant-error"
CHUNK_EXPERTS = 32
WORST_LISTED = 5


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def _expected(source: SourceCheckpoint, layer: int, experts: range):
    """Source projections of a chunk as the output must hold them, plus raw weights for BF16 sources."""
    expected, raw = {}, {}
    for proj in model.PROJECTIONS:
        weight, scale = read_projection(source, layer, experts, proj)
        if scale is None:
            raw[proj] = weight
            q, scale = quantize_fp8_block(weight)
            weight = q.view(torch.uint8)
        expected[proj] = (weight, scale)
    return expected, raw


def _rows(t: torch.Tensor, g: RankGeometry, dim: int) -> torch.Tensor:
    # A rank past the end of the intermediate rows (MiniMax TP8: ranks 6 and 7) holds none: an empty slice.
    return t.narrow(dim, min(g.row_start, t.shape[dim]), g.real_rows)


def _blocks(t: torch.Tensor, g: RankGeometry, dim: int) -> torch.Tensor:
    return t.narrow(dim, min(g.scale_row_start, t.shape[dim]), g.real_scale_rows)


def _compare_rank(report: Report, label: str, layer: int, g: RankGeometry, experts: range,
                  gate_up: GateUp, down: Down, expected) -> int:
    """Findings for every expert of the chunk whose unpacked tensors differ from the source."""
    (w1, s1), (w2, s2), (w3, s3) = expected["w1"], expected["w2"], expected["w3"]
    parts = {
        "w13_weight up half (w3)": (gate_up.up, _rows(w3, g, 1)),
        "w13_weight gate half (w1)": (gate_up.gate, _rows(w1, g, 1)),
        "w13_weight_scale_inv up half (w3)": (gate_up.up_scale, _blocks(s3, g, 1)),
        "w13_weight_scale_inv gate half (w1)": (gate_up.gate_scale, _blocks(s1, g, 1)),
        "w2_weight": (down.weight, _rows(w2, g, 2)),
        "w2_weight_scale_inv": (down.scale, _blocks(s2, g, 2)),
    }
    bad = 0
    for i, expert in enumerate(experts):
        wrong = [name for name, (got, want) in parts.items() if not torch.equal(_bits(got[i]), _bits(want[i]))]
        if not wrong:
            continue
        swapped = (
            torch.equal(_bits(gate_up.up[i]), _bits(_rows(w1, g, 1)[i]))
            and torch.equal(_bits(gate_up.gate[i]), _bits(_rows(w3, g, 1)[i]))
        )
        what = "gate and up halves of w13_weight are swapped" if swapped else f"{', '.join(wrong)} differ from the source"
        report.add(Finding(CHECK, "fail", what, shape=label, layer=layer, expert=expert, rank=g.rank))
        bad += 1
    return bad


def check_experts(ckpt: ConvertedCheckpoint, source: SourceCheckpoint, report: Report, entry: ShapeEntry,
                  layers: list[int], errors: list[tuple[float, int, int, str]]) -> None:
    label = entry.key
    profile = ckpt.profile
    ranks = ckpt.ranks(entry)
    bad = 0
    for layer in layers:
        for block_start in range(0, ckpt.shape.num_experts, entry.experts_per_rank):
            owners = [g for g in ranks if g.first_expert == block_start]
            for start in range(block_start, block_start + entry.experts_per_rank, CHUNK_EXPERTS):
                experts = range(start, min(start + CHUNK_EXPERTS, block_start + entry.experts_per_rank))
                expected, raw = _expected(source, layer, experts)
                assembled: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {p: [] for p in model.PROJECTIONS}
                for g in owners:
                    local = range(experts.start - g.first_expert, experts.stop - g.first_expert)
                    try:
                        t = ckpt.rank_layer(entry, g.rank, layer, local)
                        gate_up = profile.unpack_gate_up(Packed(t.w13, t.w13_scale), g)
                        down = profile.unpack_down(Packed(t.w2, t.w2_scale), g)
                    except (MMConvertError, RuntimeError, ValueError) as exc:
                        report.add(Finding(CHECK, "fail", f"cannot read: {exc}", shape=label, layer=layer, rank=g.rank))
                        bad += 1
                        continue
                    bad += _compare_rank(report, label, layer, g, experts, gate_up, down, expected)
                    assembled["w1"].append((g.moe_tp_rank, gate_up.gate, gate_up.gate_scale))
                    assembled["w3"].append((g.moe_tp_rank, gate_up.up, gate_up.up_scale))
                    assembled["w2"].append((g.moe_tp_rank, down.weight, down.scale))
                if raw and owners and len(assembled["w1"]) == len(owners) == entry.moe_tp:
                    _quant_errors(assembled, raw, experts, layer, errors)
    if not bad:
        report.add(Finding(CHECK, "pass", f"every expert of {len(layers)} layer(s) on {len(ranks)} ranks equals the "
                                          f"{'quantised ' if source.kind != 'fp8' else ''}source, bit for bit",
                           shape=label))


def _quant_errors(assembled, raw, experts: range, layer: int, errors: list) -> None:
    """Relative error of the output's dequantised experts (ranks reassembled) against the BF16 source."""
    for proj, pieces in assembled.items():
        pieces.sort(key=lambda p: p[0])
        dim = 2 if proj == "w2" else 1
        q = torch.cat([p[1] for p in pieces], dim=dim)
        s = torch.cat([p[2] for p in pieces], dim=dim)
        deq = dequantize_fp8_block(q.view(torch.float8_e4m3fn), s)
        for i, expert in enumerate(experts):
            errors.append((numerics.relative_error(deq[i], raw[proj][i].float()), layer, expert, proj))


def check_rank_tensors(ckpt: ConvertedCheckpoint, source: SourceCheckpoint, report: Report, entry: ShapeEntry) -> None:
    """Presharded: every non-expert tensor of every rank, cut back into the source slices it was
    assembled from (convert/sglang_state.py's recipe, inverted) and compared byte for byte; padding
    zero; SM100's re-quantised linear layers recomputed from the source and compared exactly."""
    from mm_convert.transform.rank_tensors import produce
    from mm_convert.plan.sglang_state import Assemble, Constant, ExpertTensor, PreshardedTarget, rank_state

    label = entry.key
    target = PreshardedTarget(entry.parallel, entry.gpu_arch or "")
    bad = checked = 0
    for rank in entry.present_ranks:
        for t in rank_state(source, target, rank):
            if isinstance(t.recipe, ExpertTensor):
                continue
            try:
                stored = ckpt.rank_tensor(entry, rank, t.name)
            except MMConvertError as exc:
                report.add(Finding(CHECK, "fail", str(exc), shape=label, rank=rank))
                bad += 1
                continue
            checked += 1
            if stored.dtype != DTYPES[t.dtype][0] or tuple(stored.shape) != t.shape:
                problem = f"is {stored.dtype} {list(stored.shape)}, SGLang holds {t.dtype} {list(t.shape)}"
            elif isinstance(t.recipe, Assemble):
                problem = _assembly_problem(source, stored, t.recipe)
            elif isinstance(t.recipe, Constant):
                problem = None if bool((stored == t.recipe.value).all()) else f"is not {t.recipe.value}"
            else:
                want = torch.cat([p.reshape(-1) for p in produce(source, t)]).reshape(t.shape)
                problem = None if torch.equal(_raw(stored), _raw(want)) else _requant_problem(stored, want, t.recipe)
            if problem:
                report.add(Finding(CHECK, "fail", f"{t.name} {problem}", shape=label, rank=rank))
                bad += 1
    if not bad:
        report.add(Finding(CHECK, "pass", f"{checked} non-expert tensors of {len(entry.present_ranks)} ranks are the "
                                          "source's slices, merged and padded as SGLang holds them, bit for bit", shape=label))


def _requant_problem(stored: torch.Tensor, want: torch.Tensor, recipe) -> str:
    """Which source region an SM100 re-quantised tensor differs in (its parts are whole 128-blocks)."""
    from mm_convert.transform.rank_tensors import split
    from mm_convert.plan.sglang_state import Rows

    if recipe.part == "weight":
        for (part, got), (_, expected) in zip(split(stored, recipe.weight), split(want, recipe.weight)):
            if not torch.equal(_raw(got.contiguous()), _raw(expected.contiguous())) and isinstance(part, Rows):
                return (f"differs from {part.source}[{part.start}:{part.start + part.count}] (axis {recipe.weight.axis}) "
                        "re-quantised as SGLang does on SM100")
    return "differs from the source re-quantised as SGLang does on SM100"


def _assembly_problem(source: SourceCheckpoint, stored: torch.Tensor, a) -> str | None:
    from mm_convert.transform.rank_tensors import split
    from mm_convert.plan.sglang_state import Rows

    for part, got in split(stored, a):
        if isinstance(part, Rows):
            region = source.read(part.source).narrow(a.axis, part.start, part.count)
            want = region if region.dtype == got.dtype else region.to(got.dtype)
            if not torch.equal(_raw(got.contiguous()), _raw(want.contiguous())):
                return f"differs from {part.source}[{part.start}:{part.start + part.count}] (axis {a.axis})"
        elif bool(got.ne(0).any()):
            return f"padding ({part.count} indices along axis {a.axis}) is not zero"
    return None


def check_pass_through(ckpt: ConvertedCheckpoint, source: SourceCheckpoint, report: Report) -> None:
    index = ckpt.weight_map()
    expected = set(source.non_expert_names())
    bad = 0
    for name in sorted(expected - set(index)):
        report.add(Finding(CHECK, "fail", f"non-expert tensor {name} is missing from the output"))
        bad += 1
    files: dict[str, TensorFile] = {}
    try:
        for name, file_name in sorted(index.items()):
            if name not in expected:
                report.add(Finding(CHECK, "fail", f"{file_name}: tensor {name} is not a non-expert tensor of the source"))
                bad += 1
                continue
            f = files.setdefault(file_name, TensorFile(ckpt.root / file_name))
            got, want = f.read(name), source.read(name)
            if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(_raw(got), _raw(want)):
                report.add(Finding(CHECK, "fail", f"{file_name}: tensor {name} differs from the source"))
                bad += 1
    finally:
        for f in files.values():
            f.close()
    if not bad:
        report.add(Finding(CHECK, "pass", f"{len(expected)} non-expert tensors byte-identical to the source"))


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def check_config(ckpt: ConvertedCheckpoint, source: SourceCheckpoint, report: Report) -> None:
    config = {k: v for k, v in ckpt.config.items() if k != output_format.CONFIG_BLOCK_KEY}
    want = dict(source.config)
    if source.kind != "fp8":
        config.pop("quantization_config", None)  # added for BF16 sources: the experts are FP8 now
    if config != want:
        keys = sorted(k for k in set(config) | set(want) if config.get(k) != want.get(k))
        report.add(Finding(CHECK, "fail", f"config.json differs from the source's in {', '.join(keys)}"))
    else:
        report.add(Finding(CHECK, "pass", "config.json is the source's, plus the mm_convert block"))


def run(ckpt: ConvertedCheckpoint, source: SourceCheckpoint, report: Report, layers: list[int] | None = None) -> None:
    if source.shape != ckpt.shape:
        report.add(Finding(CHECK, "fail", f"the source's config describes a different model ({source.shape} vs {ckpt.shape})"))
        return
    check_config(ckpt, source, report)
    if ckpt.block.format == "experts":
        check_pass_through(ckpt, source, report)
    layers = list(range(ckpt.shape.num_layers)) if layers is None else layers
    errors: list[tuple[float, int, int, str]] = []
    for entry in ckpt.block.shapes:
        try:
            entry.parallel.validate(ckpt.shape)
        except MMConvertError:
            continue  # reported by the structure check
        errors.clear()
        if entry.format == "presharded":
            check_rank_tensors(ckpt, source, report, entry)
        check_experts(ckpt, source, report, entry, layers, errors)
        if source.kind != "fp8" and errors:
            _report_quant_errors(report, entry.key, errors)


def _report_quant_errors(report: Report, label: str, errors: list[tuple[float, int, int, str]]) -> None:
    worst = sorted(errors, reverse=True)
    over = [e for e in worst if not e[0] <= numerics.QUANT_ERROR_LIMIT]
    for err, layer, expert, proj in over:
        report.add(Finding(QCHECK, "fail", f"{proj}: relative error {err:.4f} exceeds {numerics.QUANT_ERROR_LIMIT}",
                           shape=label, layer=layer, expert=expert, metrics={"rel_l2": err}))
    mean = sum(e[0] for e in errors) / len(errors)
    by_layer: dict[int, list[float]] = {}
    for err, layer, _, _ in errors:
        by_layer.setdefault(layer, []).append(err)
    per_layer = [[layer, len(v), sum(v) / len(v), max(v)] for layer, v in sorted(by_layer.items())]
    listed = ", ".join(f"L{l} e{e} {p} {err:.4f}" for err, l, e, p in worst[:WORST_LISTED])
    report.add(Finding(QCHECK, "pass" if not over else "info",
                       f"{len(errors)} tensors: mean relative error {mean:.4f}, worst {worst[0][0]:.4f} "
                       f"(limit {numerics.QUANT_ERROR_LIMIT}); worst: {listed}",
                       shape=label, metrics={"mean_rel_l2": mean, "max_rel_l2": worst[0][0], "tensors": len(errors),
                                             "limit": numerics.QUANT_ERROR_LIMIT, "per_layer": per_layer,
                                             "worst": [list(w) for w in worst[:WORST_LISTED]]}))


# -- without the source: the digests recorded at conversion --------------------------------------------


def run_digests(ckpt: ConvertedCheckpoint, report: Report) -> None:
    """Undo the layout from the stored bytes and compare with the source digests the manifest records
    (convert/digests.py): every expert projection of every layer, and every other source tensor the
    folder holds as such. Catches value-preserving tampering (experts swapped, a rank's tensors moved,
    a scale doubled) that file hashes rewritten to match would hide."""
    try:
        manifest = ckpt.manifest()
    except MMConvertError as exc:
        report.add(Finding(CHECK, "skip", f"not run: {exc}"))
        return
    digests = manifest.source_digests
    if not digests:
        report.add(Finding(CHECK, "skip", "not run: the manifest records no source digests (an older conversion); "
                                          "use --source"))
        return
    for entry in ckpt.block.shapes:
        try:
            entry.parallel.validate(ckpt.shape)
        except MMConvertError:
            continue
        if entry.ranks is not None:
            report.add(Finding(CHECK, "skip", f"not run without --source: the folder holds ranks "
                                              f"{','.join(map(str, entry.ranks))} only, not whole tensors", shape=entry.key))
            continue
        bad = _expert_digest_problems(ckpt, report, entry, digests)
        checked, tensor_bad = _tensor_digest_problems(ckpt, report, entry, digests)
        if not bad and not tensor_bad:
            report.add(Finding(CHECK, "pass", f"every expert projection of {ckpt.shape.num_layers} layers and {checked} "
                                              "other tensors undo to the bytes the conversion read (recorded digests)",
                               shape=entry.key))


def _expert_digest_problems(ckpt: ConvertedCheckpoint, report: Report, entry: ShapeEntry, digests: dict[str, str]) -> int:
    from mm_convert.read.digests import expert_digest_name

    ranks = ckpt.ranks(entry)
    bad = 0
    for layer in range(ckpt.shape.num_layers):
        hashers = {(p, s): xxhash.xxh3_128() for p in model.PROJECTIONS for s in (False, True)}
        try:
            for block_start in range(0, ckpt.shape.num_experts, entry.experts_per_rank):
                owners = sorted((g for g in ranks if g.first_expert == block_start), key=lambda g: g.moe_tp_rank)
                for start in range(block_start, block_start + entry.experts_per_rank, CHUNK_EXPERTS):
                    local = range(start - block_start, min(start + CHUNK_EXPERTS, block_start + entry.experts_per_rank) - block_start)
                    parts = []
                    for g in owners:
                        t = ckpt.rank_layer(entry, g.rank, layer, local)
                        parts.append((ckpt.profile.unpack_gate_up(Packed(t.w13, t.w13_scale), g),
                                      ckpt.profile.unpack_down(Packed(t.w2, t.w2_scale), g)))
                    whole = {
                        ("w1", False): torch.cat([gu.gate for gu, _ in parts], 1),
                        ("w3", False): torch.cat([gu.up for gu, _ in parts], 1),
                        ("w2", False): torch.cat([dn.weight for _, dn in parts], 2),
                        ("w1", True): torch.cat([gu.gate_scale for gu, _ in parts], 1),
                        ("w3", True): torch.cat([gu.up_scale for gu, _ in parts], 1),
                        ("w2", True): torch.cat([dn.scale for _, dn in parts], 2),
                    }
                    for key, tensor in whole.items():
                        hashers[key].update(tensor_bytes(tensor.contiguous()))
        except (MMConvertError, RuntimeError, ValueError) as exc:
            report.add(Finding(CHECK, "fail", f"cannot read: {exc}", shape=entry.key, layer=layer))
            bad += 1
            continue
        for (proj, is_scale), h in hashers.items():
            want = digests.get(expert_digest_name(layer, proj, is_scale))
            if want is None:
                report.add(Finding(CHECK, "fail", f"{proj} {'scales' if is_scale else 'weights'}: no digest recorded",
                                   shape=entry.key, layer=layer))
                bad += 1
            elif h.hexdigest() != want:
                report.add(Finding(CHECK, "fail", f"{proj} {'scales' if is_scale else 'weights'} of the layer's experts "
                                                  "do not undo to the bytes the conversion read (recorded digest): "
                                                  "experts swapped, moved or changed", shape=entry.key, layer=layer))
                bad += 1
    return bad


def _tensor_digest_problems(ckpt: ConvertedCheckpoint, report: Report, entry: ShapeEntry,
                            digests: dict[str, str]) -> tuple[int, int]:
    """(tensors checked, failures) for the non-expert source tensors the folder holds as such."""
    from mm_convert.read.digests import tensor_digest

    names = [n for n in digests if ".experts.*." not in n]
    if entry.format == "presharded":
        names = [n for n in names if n not in _requantised_sources(ckpt, entry)]
    if entry.format == "experts":
        weight_map = ckpt.weight_map()
        rebuilt = {n: ckpt.file(ckpt.root / weight_map[n]).read(n) for n in names if n in weight_map}
    else:
        rebuilt = _reassembled(ckpt, entry, set(names))
    bad = 0
    for name in sorted(names):
        tensor = rebuilt.get(name)
        if tensor is None:
            report.add(Finding(CHECK, "fail", f"{name}: the folder does not hold it whole", shape=entry.key))
            bad += 1
        elif tensor_digest(tensor) != digests[name]:
            report.add(Finding(CHECK, "fail", f"{name} does not undo to the bytes the conversion read (recorded digest)",
                               shape=entry.key))
            bad += 1
    return len(names), bad


def _requantised_sources(ckpt: ConvertedCheckpoint, entry: ShapeEntry) -> set[str]:
    """Source tensors this shape holds only re-quantised (SM100 attention): not recoverable from it."""
    from mm_convert.plan.sglang_state import PreshardedTarget, Ue8m0Requant, rank_state, sources_of
    from mm_convert.validators.checkpoint import OutputView

    target = PreshardedTarget(entry.parallel, entry.gpu_arch or "")
    state = rank_state(OutputView(ckpt), target, entry.present_ranks[0])
    return {n for t in state if isinstance(t.recipe, Ue8m0Requant) for n in sources_of(t.recipe)}


def _reassembled(ckpt: ConvertedCheckpoint, entry: ShapeEntry, wanted: set[str]) -> dict[str, torch.Tensor]:
    """Presharded: each wanted source tensor put back together from every rank's slices of it."""
    from mm_convert.transform.rank_tensors import split
    from mm_convert.plan.sglang_state import Assemble, PreshardedTarget, Rows, rank_state
    from mm_convert.validators.checkpoint import OutputView

    target = PreshardedTarget(entry.parallel, entry.gpu_arch or "")
    pieces: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    axes: dict[str, int] = {}
    for rank in entry.present_ranks:
        for t in rank_state(OutputView(ckpt), target, rank):
            if not isinstance(t.recipe, Assemble) or not any(isinstance(p, Rows) and p.source in wanted for p in t.recipe.parts):
                continue
            stored = ckpt.rank_tensor(entry, rank, t.name)
            for part, view in split(stored, t.recipe):
                if isinstance(part, Rows) and part.source in wanted:
                    pieces.setdefault(part.source, {})[(part.start, part.count)] = view
                    axes[part.source] = t.recipe.axis
    out = {}
    for name, by_range in pieces.items():
        ordered = sorted(by_range.items())
        position, parts = 0, []
        for (start, count), view in ordered:
            if start > position:
                break  # a gap: rows no rank holds
            if start + count > position:
                parts.append(view.narrow(axes[name], position - start, start + count - position))
                position = start + count
        else:
            out[name] = torch.cat(parts, dim=axes[name]) if len(parts) > 1 else parts[0]
    return out
