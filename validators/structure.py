"""Structure: the files are the ones the manifest lists, complete, shaped as the profile says,
covering every expert of every layer exactly once, padded with exact zeros, with sane scales."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from mm_convert import output_format
from mm_convert.plan import presharded
from mm_convert.errors import MMConvertError
from mm_convert.fsutil import sha256_file
from mm_convert.output_format import EXPERT_DTYPES
from mm_convert.transform.quant import fp8_nan_per_item
from mm_convert.read.safetensors_file import read_header, tensor_bytes
from mm_convert.plan.sglang_state import PreshardedTarget
from mm_convert.validators.checkpoint import ConvertedCheckpoint, OutputView
from mm_convert.validators.report import Finding, Report

CHECK = "structure"


def check_manifest(ckpt: ConvertedCheckpoint, report: Report, on_bytes=None) -> None:
    """Every listed file exists with its size and sha256; no unlisted file sits among the outputs."""
    try:
        manifest = ckpt.manifest()
    except MMConvertError as exc:
        report.add(Finding(CHECK, "fail", str(exc)))
        return
    listed = {f.path for f in manifest.files}
    bad = 0
    for rec in manifest.files:
        path = ckpt.root / rec.path
        if not path.is_file():
            report.add(Finding(CHECK, "fail", f"{rec.path}: listed in the manifest but missing"))
            bad += 1
        elif path.stat().st_size != rec.size:
            report.add(Finding(CHECK, "fail", f"{rec.path}: {path.stat().st_size} bytes, the manifest says {rec.size}"))
            bad += 1
        elif sha256_file(path, on_bytes) != rec.sha256:
            report.add(Finding(CHECK, "fail", f"{rec.path}: sha256 differs from the manifest"))
            bad += 1
    for path in sorted(p for p in ckpt.root.rglob("*.safetensor*") if p.suffix in (".safetensors", presharded.FILE_SUFFIX)):
        rel = str(path.relative_to(ckpt.root))
        if not rel.startswith(output_format.WORK_DIR) and rel not in listed:
            report.add(Finding(CHECK, "fail", f"{rel}: not listed in the manifest"))
            bad += 1
    if manifest.profile != ckpt.block.profile:
        report.add(Finding(CHECK, "fail", f"manifest profile {manifest.profile!r} but config block profile {ckpt.block.profile!r}"))
        bad += 1
    for required in (output_format.CONFIG_NAME, output_format.MODEL_CARD_NAME):
        if required not in listed:
            report.add(Finding(CHECK, "fail", f"{required}: not listed in the manifest, so nothing proves it is the "
                                              "one the conversion wrote"))
            bad += 1
    recorded = {s.dir for s in manifest.shapes}
    listed_shapes = {s.dir for s in ckpt.block.shapes}
    if recorded != listed_shapes:
        report.add(Finding(CHECK, "fail", f"the manifest records shapes {sorted(map(str, recorded))} but config.json "
                                          f"lists {sorted(listed_shapes)}"))
        bad += 1
    if not bad:
        report.add(Finding(CHECK, "pass", f"manifest: {len(manifest.files)} files, sizes and sha256 match"))


def check_config_block(ckpt: ConvertedCheckpoint, report: Report) -> None:
    block, profile = ckpt.block, ckpt.profile
    problems = []
    if block.format_version != output_format.FORMAT_VERSION:
        problems.append(f"format_version {block.format_version} is not {output_format.FORMAT_VERSION}, the one this "
                        "tool writes and checks")
    for folder in _shape_folders_on_disk(ckpt.root):
        if folder not in {s.dir for s in block.shapes}:
            problems.append(f"{folder}: a shape folder on disk that the block does not list")
    if (block.use_shuffled_weight, block.weight_layout) != (profile.flags.use_shuffled_weight, profile.flags.weight_layout):
        problems.append(
            f"kernel flags use_shuffled_weight={block.use_shuffled_weight}, weight_layout={block.weight_layout} "
            f"do not match profile {profile.name!r}"
        )
    first = block.shapes[0]
    seen = set()
    for entry in block.shapes:
        par = entry.parallel
        try:
            par.validate(ckpt.shape)
        except MMConvertError as exc:
            problems.append(f"shape {par.dirname}: {exc}")
            continue
        if entry.dir in seen:
            problems.append(f"shape {entry.key} listed twice")
        seen.add(entry.dir)
        if entry.format != block.format:
            problems.append(f"shape {entry.key}: format {entry.format!r} in a {block.format!r} folder")
        expect = {
            "moe_tp": par.moe_tp,
            "padded_intermediate_size": par.padded_intermediate_size(ckpt.shape),
            "experts_per_rank": par.experts_per_rank(ckpt.shape),
        }
        if entry.format == "experts":
            expect["dir"] = output_format.shape_dir(par)
        elif not entry.dir.startswith(output_format.presharded_root(block.moe_runner_backend, str(entry.gpu_arch)) + "/"):
            problems.append(f"shape {entry.key}: folder is not under the root named for backend "
                            f"{block.moe_runner_backend} and GPU {entry.gpu_arch}")
        for key, want in expect.items():
            if getattr(entry, key) != want:
                problems.append(f"shape {par.dirname}: {key} = {getattr(entry, key)!r}, expected {want!r}")
    top = ckpt.config[output_format.CONFIG_BLOCK_KEY]
    for key in ("tp", "ep", "moe_tp", "padded_intermediate_size"):
        if top.get(key) != getattr(first, key):
            problems.append(f"top-level {key} = {top.get(key)!r} disagrees with shapes[0] ({getattr(first, key)!r})")
    for p in problems:
        report.add(Finding(CHECK, "fail", f"config.json mm_convert block: {p}"))
    if not problems:
        report.add(Finding(CHECK, "pass", f"config block: profile {profile.name}, {len(block.shapes)} shape(s)"))


def _shape_folders_on_disk(root: Path) -> list[str]:
    """Every experts/tp{T}-ep{E} and presharded-*/TP-* folder present (listed or not)."""
    found = []
    experts = root / output_format.EXPERTS_DIR
    if experts.is_dir():
        found += [f"{output_format.EXPERTS_DIR}/{p.name}" for p in sorted(experts.iterdir()) if p.is_dir()]
    for top in sorted(root.glob(f"{output_format.PRESHARDED_ROOT_PREFIX}*")):
        if top.is_dir():
            found += [f"{top.name}/{p.name}" for p in sorted(top.iterdir()) if p.is_dir()]
    return found


def check_shape_files(ckpt: ConvertedCheckpoint, report: Report) -> None:
    """Per shape: every rank's parts present, metadata and tensor shapes as planned, experts covered once."""
    for entry in ckpt.block.shapes:
        if entry.format != "experts":
            continue
        try:
            entry.parallel.validate(ckpt.shape)
        except MMConvertError:
            continue  # already reported by the config-block check
        label = entry.parallel.dirname
        ranks = ckpt.ranks(entry)
        shapes = ckpt.profile.shapes(ckpt.shape.hidden_size, ranks[0])
        want_shapes = {
            "w13_weight": shapes.w13, "w13_weight_scale_inv": shapes.w13_scale,
            "w2_weight": shapes.w2, "w2_weight_scale_inv": shapes.w2_scale,
        }
        coverage: Counter = Counter()  # (layer, moe_tp_rank, expert) -> times present
        bad = 0
        existing = sorted(p.name for p in (ckpt.root / entry.dir).glob("rank-*-part-*.safetensors")) \
            if (ckpt.root / entry.dir).is_dir() else []
        expected_names = {Path(output_format.rank_part_file_name(entry.parallel, r, p)).name
                          for r in range(entry.tp) for p in range(entry.parts_per_rank)}
        for extra in sorted(set(existing) - expected_names):
            report.add(Finding(CHECK, "fail", f"{entry.dir}/{extra}: not a file of this shape", shape=label))
            bad += 1
        for g in ranks:
            for part in range(entry.parts_per_rank):
                path = ckpt.part_path(entry, g.rank, part)
                rel = str(path.relative_to(ckpt.root))
                if not path.is_file():
                    report.add(Finding(CHECK, "fail", f"{rel}: missing", shape=label, rank=g.rank))
                    bad += 1
                    continue
                try:
                    header = read_header(path)
                except MMConvertError as exc:
                    report.add(Finding(CHECK, "fail", str(exc), shape=label, rank=g.rank))
                    bad += 1
                    continue
                meta = header.metadata or {}
                want_meta = output_format.part_metadata(ckpt.profile.name, entry.parallel, g)
                for key, want in want_meta.items():
                    if meta.get(key) != want:
                        report.add(Finding(CHECK, "fail", f"{rel}: metadata {key} = {meta.get(key)!r}, expected {want!r}",
                                           shape=label, rank=g.rank))
                        bad += 1
                offset = int(meta.get("local_expert_offset", g.first_expert))
                count = int(meta.get("local_num_experts", g.num_local_experts))
                for info in header.tensors:
                    parsed = output_format.parse_expert_tensor_name(info.name)
                    if parsed is None:
                        report.add(Finding(CHECK, "fail", f"{rel}: unexpected tensor {info.name}", shape=label, rank=g.rank))
                        bad += 1
                        continue
                    layer, kind = parsed
                    if info.dtype != EXPERT_DTYPES[kind] or info.shape != want_shapes[kind]:
                        report.add(Finding(
                            CHECK, "fail",
                            f"{rel}: {info.name} is {info.dtype} {list(info.shape)}, profile {ckpt.profile.name} "
                            f"expects {EXPERT_DTYPES[kind]} {list(want_shapes[kind])}",
                            shape=label, layer=layer, rank=g.rank))
                        bad += 1
                    if kind == "w13_weight":
                        for e in range(offset, offset + count):
                            coverage[(layer, g.moe_tp_rank, e)] += 1
        for layer in range(ckpt.shape.num_layers):
            for t in range(entry.moe_tp):
                for e in range(ckpt.shape.num_experts):
                    n = coverage[(layer, t, e)]
                    if n != 1:
                        report.add(Finding(CHECK, "fail", f"expert present {n} times across the ranks (moe_tp_rank {t})",
                                           shape=label, layer=layer, expert=e))
                        bad += 1
        if not bad:
            report.add(Finding(CHECK, "pass", f"{entry.tp} ranks x {entry.parts_per_rank} parts: metadata, shapes, "
                                              f"every expert of every layer once", shape=label))


def check_padding_and_scales(ckpt: ConvertedCheckpoint, report: Report, layers: list[int] | None = None) -> None:
    """Padded rows/columns and scale blocks exactly zero; real scales finite and positive."""
    for entry in ckpt.block.shapes:
        try:
            entry.parallel.validate(ckpt.shape)
        except MMConvertError:
            continue
        label = entry.key
        bad = 0
        for g in ckpt.ranks(entry):
            ip, real, ipb, real_b = g.padded_intermediate_size, g.real_rows, g.padded_scale_rows, g.real_scale_rows
            for layer in layers if layers is not None else range(ckpt.shape.num_layers):
                try:
                    t = ckpt.rank_layer(entry, g.rank, layer)
                    w13 = ckpt.profile.to_major_k(t.w13).view(torch.uint8)
                    w2 = ckpt.profile.to_major_k(t.w2).view(torch.uint8)
                except (MMConvertError, RuntimeError, ValueError) as exc:
                    report.add(Finding(CHECK, "fail", f"cannot read: {exc}", shape=label, layer=layer, rank=g.rank))
                    bad += 1
                    continue
                pads = {
                    "w13_weight up padding": w13[:, real:ip], "w13_weight gate padding": w13[:, ip + real:],
                    "w2_weight padding": w2[:, :, real:],
                    "w13_weight_scale_inv up padding": t.w13_scale[:, real_b:ipb],
                    "w13_weight_scale_inv gate padding": t.w13_scale[:, ipb + real_b:],
                    "w2_weight_scale_inv padding": t.w2_scale[:, :, real_b:],
                }
                for what, region in pads.items():
                    # Bit patterns, not values: -0.0 is not the +0.0 SGLang's loader writes, in weights or scales.
                    bits = region.contiguous().view(torch.uint8 if region.element_size() == 1 else torch.int32)
                    nonzero = bits.reshape(region.shape[0], -1).ne(0).any(dim=1)
                    for e in nonzero.nonzero().flatten().tolist()[:3]:
                        report.add(Finding(CHECK, "fail", f"{what} is not zero", shape=label, layer=layer,
                                           expert=g.first_expert + e, rank=g.rank))
                        bad += 1
                reals = {
                    "w13_weight_scale_inv (up)": t.w13_scale[:, :real_b], "w13_weight_scale_inv (gate)": t.w13_scale[:, ipb:ipb + real_b],
                    "w2_weight_scale_inv": t.w2_scale[:, :, :real_b],
                }
                for what, region in reals.items():
                    flat = region.reshape(region.shape[0], -1)
                    wrong = (~torch.isfinite(flat) | (flat <= 0)).any(dim=1)
                    for e in wrong.nonzero().flatten().tolist()[:3]:
                        report.add(Finding(CHECK, "fail", f"{what}: a real scale block is not finite and positive",
                                           shape=label, layer=layer, expert=g.first_expert + e, rank=g.rank))
                        bad += 1
                nan = fp8_nan_per_item(w13) | fp8_nan_per_item(w2)
                for e in nan.nonzero().flatten().tolist()[:3]:
                    report.add(Finding(CHECK, "fail", "FP8 weight holds NaN", shape=label, layer=layer,
                                       expert=g.first_expert + e, rank=g.rank))
                    bad += 1
        if not bad:
            report.add(Finding(CHECK, "pass", "padding exactly zero; real scales finite and positive; no FP8 NaN",
                               shape=label))


def check_index(ckpt: ConvertedCheckpoint, report: Report) -> None:
    if ckpt.block.format == "presharded":
        strays = sorted(p.name for p in ckpt.root.glob("*.safetensors")) + \
            ([output_format.INDEX_NAME] if (ckpt.root / output_format.INDEX_NAME).exists() else [])
        for name in strays:
            report.add(Finding(CHECK, "fail", f"{name}: a presharded folder holds no top-level weights (SGLang's "
                                              "default loader would load them and leave every other tensor unset)"))
        if not strays:
            report.add(Finding(CHECK, "pass", "no top-level weights: only --load-format presharded can load this folder"))
        return
    try:
        weight_map = ckpt.weight_map()
    except MMConvertError as exc:
        report.add(Finding(CHECK, "fail", str(exc)))
        return
    bad = 0
    files: dict[str, set[str]] = {}
    for name, file_name in weight_map.items():
        files.setdefault(file_name, set()).add(name)
    for file_name, names in sorted(files.items()):
        try:
            present = {t.name for t in read_header(ckpt.root / file_name).tensors}
        except MMConvertError as exc:
            report.add(Finding(CHECK, "fail", str(exc)))
            bad += 1
            continue
        if present != names:
            report.add(Finding(CHECK, "fail", f"{file_name}: holds {len(present)} tensors, the index lists {len(names)}"))
            bad += 1
    if not bad:
        report.add(Finding(CHECK, "pass", f"index: {len(weight_map)} non-expert tensors in {len(files)} shard(s)"))


def check_presharded(ckpt: ConvertedCheckpoint, report: Report) -> None:
    """Per presharded folder: the key SGLang computes, READY, checksum.json, every rank's reads, every
    stored tensor re-hashed against its key, every rank checksum recomputed by SGLang's rule."""
    for entry in ckpt.block.shapes:
        if entry.format != "presharded":
            continue
        label = entry.key
        problems: list[tuple[str, int | None]] = []
        try:
            expected = presharded.launch_state(OutputView(ckpt), PreshardedTarget(entry.parallel, entry.gpu_arch or ""))
        except MMConvertError as exc:
            report.add(Finding(CHECK, "fail", f"cannot derive SGLang's state for this launch: {exc}", shape=label))
            continue
        folder = ckpt.root / entry.dir
        if entry.dir != expected.folder:
            problems.append((f"SGLang looks for {expected.folder}, not {entry.dir}: the launch would not find this "
                             "folder (config.json or the shape changed?)", None))
        problems += [(p, None) for p in _ready_problems(folder, entry.tp)]
        try:
            plan = ckpt.checksum(entry)
            reads = ckpt.reads(entry)
        except MMConvertError as exc:
            report.add(Finding(CHECK, "fail", str(exc), shape=label))
            continue
        if plan.get("version") != presharded.PLAN_VERSION or plan.get("world_size") != entry.tp:
            problems.append((f"checksum.json: version {plan.get('version')!r}, world_size {plan.get('world_size')!r}; "
                             f"SGLang needs {presharded.PLAN_VERSION} and {entry.tp}", None))
        if plan.get("shard_config") != expected.shard_config:
            problems.append(("checksum.json: shard_config is not the one SGLang computes for this launch", None))
        listed = {f.get("filename") for f in plan.get("files", []) if isinstance(f, dict)}
        on_disk = {p.name for p in folder.glob(f"*{presharded.FILE_SUFFIX}")}
        problems += [(f"{name}: not listed in checksum.json", None) for name in sorted(on_disk - listed)]
        hashed: dict[tuple[str, str], str] = {}
        for rank in entry.present_ranks:
            problems += [(p, rank) for p in _rank_problems(ckpt, entry, rank, expected.states[rank], reads, plan, hashed)]
        for message, rank in problems[:50]:
            report.add(Finding(CHECK, "fail", message, shape=label, rank=rank))
        if not problems:
            report.add(Finding(CHECK, "pass", f"SGLang's key, READY, checksum.json; {len(entry.present_ranks)} ranks read "
                                              f"every parameter; {len(hashed)} stored tensors re-hashed to their keys; "
                                              "rank checksums recomputed", shape=label))


def _ready_problems(folder: Path, world_size: int) -> list[str]:
    ready = folder / presharded.READY_NAME
    if not ready.is_file():
        return [f"{presharded.READY_NAME}: missing, so SGLang would not use the folder"]
    try:
        d = json.loads(ready.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return [f"{presharded.READY_NAME}: not readable JSON"]
    if not isinstance(d, dict) or d.get("plan_version") != presharded.PLAN_VERSION or d.get("world_size") != world_size:
        return [f"{presharded.READY_NAME}: plan_version or world_size does not match checksum.json"]
    return []


def _rank_problems(ckpt: ConvertedCheckpoint, entry, rank: int, state, reads, plan, hashed) -> list[str]:
    folder = ckpt.root / entry.dir
    problems = []
    names = {n for r, n in reads if r == rank}
    want = {t.name: t for t in state}
    problems += [f"reads no {n} (SGLang's loader would stop: missing key)" for n in sorted(set(want) - names)[:5]]
    problems += [f"reads {n}, which SGLang's model does not have" for n in sorted(names - set(want))[:5]]
    pairs = []
    for name in sorted(names & set(want)):
        file_name, key = reads[(rank, name)]
        t = want[name]
        pairs.append((name, key))
        path = folder / file_name
        if not path.is_file():
            problems.append(f"{file_name}: missing (rank {rank} reads {name} from it)")
            continue
        info = ckpt.file(path).tensors.get(key)
        if info is None:
            problems.append(f"{file_name}: has no tensor {key} ({name})")
            continue
        if info.dtype != t.dtype or info.shape != t.shape:
            problems.append(f"{file_name}: {name} is {info.dtype} {list(info.shape)}, SGLang holds {t.dtype} {list(t.shape)}")
            continue
        if (file_name, key) not in hashed:
            h = presharded.content_hasher(str(info.torch_dtype), info.shape)
            h.update(tensor_bytes(ckpt.file(path).read(key)))
            hashed[(file_name, key)] = h.hexdigest()
        if hashed[(file_name, key)] != key:
            problems.append(f"{file_name}: {name} no longer hashes to its key {key} (verify_on_load would fail)")
    expected_sum = plan.get("rank_checksums", {}).get(str(rank))
    if expected_sum != presharded.rank_checksum(pairs) and not problems:
        problems.append(f"checksum.json: rank checksum {expected_sum!r} is not {presharded.rank_checksum(pairs)!r} "
                        "(SGLang's rule over the rank's names and keys)")
    return problems


def run(ckpt: ConvertedCheckpoint, report: Report, layers: list[int] | None = None, on_bytes=None) -> None:
    check_manifest(ckpt, report, on_bytes)
    check_config_block(ckpt, report)
    check_index(ckpt, report)
    check_shape_files(ckpt, report)
    check_presharded(ckpt, report)
    check_padding_and_scales(ckpt, report, layers)
