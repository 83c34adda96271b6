"""`mm-convert inspect`: a readable summary of a source or a converted checkpoint.

Reads only configs, indexes, manifests and safetensors headers (never tensor data).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mm_convert import model, output_format
from mm_convert.errors import MMConvertError
from mm_convert.fsutil import read_json_object
from mm_convert.write.manifest import Manifest
from mm_convert.output_format import ConfigBlock
from mm_convert.plan.parallel import ParallelShape
from mm_convert.read.safetensors_file import read_header
from mm_convert.plan.estimate import planned_files
from mm_convert.plan.build import build_presharded_plan
from mm_convert.plan.sglang_state import DEFAULT_GPU_ARCH, PreshardedTarget
from mm_convert.read.source import SourceCheckpoint
from mm_convert.units import human_bytes


@dataclass
class Summary:
    """What `inspect` found: lines for people, and the same facts as plain data (`--json`)."""

    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: object = "") -> None:
        self.lines.append(f"{key:<28}{value}" if value != "" else key)

    def render(self) -> str:
        return "\n".join(self.lines)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True)


def _dtype_census(tensors) -> str:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for info in tensors:
        counts[info.dtype] += 1
        sizes[info.dtype] += info.nbytes
    return ", ".join(f"{d} {counts[d]} tensors / {human_bytes(sizes[d])}" for d in sorted(counts))


def inspect_path(path: str | Path) -> Summary:
    path = Path(path)
    config = read_json_object(path / output_format.CONFIG_NAME)
    if output_format.CONFIG_BLOCK_KEY in config:
        return _inspect_converted(path, config)
    return _inspect_source(path)


def _model_lines(s: Summary, shape: model.ModelShape, config: dict) -> None:
    s.data["model"] = {"architectures": config.get("architectures", []), "num_layers": shape.num_layers,
                       "num_experts": shape.num_experts, "top_k": shape.top_k, "hidden_size": shape.hidden_size,
                       "intermediate_size": shape.intermediate_size, "num_attention_heads": shape.num_attention_heads,
                       "num_key_value_heads": shape.num_key_value_heads, "head_dim": shape.head_dim,
                       "quantization_config": config.get("quantization_config")}
    s.add("architecture", ", ".join(config.get("architectures", [])) or config.get("model_type"))
    s.add("layers x experts (top-k)", f"{shape.num_layers} x {shape.num_experts} (top-{shape.top_k})")
    s.add("hidden / intermediate", f"{shape.hidden_size} / {shape.intermediate_size}")
    s.add("attention", f"{shape.num_attention_heads} q heads, {shape.num_key_value_heads} kv heads, head_dim {shape.head_dim}")
    q = config.get("quantization_config")
    if q:
        s.add("quantization_config", f"{q.get('quant_method')} {q.get('fmt', '')} blocks {q.get('weight_block_size')}")


def _inspect_source(path: Path) -> Summary:
    with SourceCheckpoint.open(path) as src:
        s = Summary(data={"kind": "source", "path": str(src.root)})
        s.add(f"source checkpoint: {src.root}")
        _model_lines(s, src.shape, src.config)
        s.data.update(experts={"kind": src.kind, "dtype": src.expert_dtype, "bytes": src.expert_bytes()},
                      shards=[{"name": f.name, "bytes": f.size} for f in src.files],
                      tensors=dict(Counter(i.dtype for i in src.tensors.values())),
                      auxiliary_files=src.auxiliary_files(), shapes=[])
        s.add("routed experts", f"{src.kind.upper()} ({src.expert_dtype}), {human_bytes(src.expert_bytes())}")
        s.add("shards", f"{len(src.files)} files, {human_bytes(sum(f.size for f in src.files))}")
        s.add("tensors", f"{len(src.tensors)}: {_dtype_census(src.tensors.values())}")
        s.add("auxiliary files", ", ".join(src.auxiliary_files()) or "none")
        for tp, ep in ((4, 1), (4, 4), (8, 1), (8, 8)):
            shape = ParallelShape(tp, ep)
            try:
                shape.validate(src.shape)
                ip = shape.padded_intermediate_size(src.shape)
                files, per_rank = planned_files(build_presharded_plan(src, PreshardedTarget(shape, DEFAULT_GPU_ARCH)))
                total = sum(f.bytes for f in files)
                s.add(f"  {shape.label} would give", f"{shape.experts_per_rank(src.shape)} experts/rank, I_p {ip}; "
                      f"presharded {DEFAULT_GPU_ARCH}: {len(files)} files, {human_bytes(total)}, "
                      f"{human_bytes(max(per_rank))} per rank")
                s.data["shapes"].append({"tp": tp, "ep": ep, "experts_per_rank": shape.experts_per_rank(src.shape),
                                         "padded_intermediate_size": ip, "presharded_files": len(files),
                                         "presharded_bytes": total, "rank_bytes": list(per_rank)})
            except MMConvertError as exc:
                s.add(f"  {shape.label}", f"not possible: {exc}")
                s.data["shapes"].append({"tp": tp, "ep": ep, "error": str(exc)})
        return s


def _presharded_lines(s: Summary, path: Path, entry, block: ConfigBlock) -> None:
    from mm_convert.plan import presharded
    from mm_convert.plan.sglang_state import GPU_ARCH_NAMES

    folder = path / entry.dir
    files = sorted(folder.glob(f"*{presharded.FILE_SUFFIX}"))
    ranks = "all ranks" if entry.ranks is None else f"ranks {','.join(map(str, entry.ranks))} of {entry.tp}"
    s.add(f"shape {entry.parallel.label}", f"presharded for SGLang {entry.sglang_version} on "
          f"{GPU_ARCH_NAMES.get(entry.gpu_arch or '', entry.gpu_arch)}: {ranks}, moe_tp {entry.moe_tp}, "
          f"I_p {entry.padded_intermediate_size}, {entry.experts_per_rank} experts/rank")
    s.add("  folder", f"{entry.dir} ({len(files)} tensor files, {human_bytes(sum(f.stat().st_size for f in files))}, "
          f"READY {'present' if (folder / presharded.READY_NAME).is_file() else 'MISSING'})")
    try:
        plan = json.loads((folder / presharded.CHECKSUM_NAME).read_text())
        reads = plan["rank_to_reads"].get(str(entry.present_ranks[0]), [])
        stored = {t["stored_key"] for f in plan["files"] for t in f["tensors"]}
        held = sum(len(v) for v in plan["rank_to_reads"].values())
        s.add("  tensors", f"rank {entry.present_ranks[0]} holds {len(reads)} parameters; {len(stored)} stored "
              f"for {held} held across all ranks (deduplicated)")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        s.add("  checksum.json", f"unreadable ({type(exc).__name__})")
    s.add("  serve with", presharded.launch_command(str(path.resolve()), entry.tp, entry.ep, entry.dir.split("/")[0],
                                                    block.moe_runner_backend))


def _inspect_converted(path: Path, config: dict) -> Summary:
    block = ConfigBlock.from_dict(config[output_format.CONFIG_BLOCK_KEY], str(path / output_format.CONFIG_NAME))
    shape = model.read_model_shape(config, str(path / output_format.CONFIG_NAME))
    s = Summary(data={"kind": "converted", "path": str(path), "block": config[output_format.CONFIG_BLOCK_KEY]})
    s.add(f"converted checkpoint: {path}")
    _model_lines(s, shape, config)
    s.add("profile", f"{block.profile} (use_shuffled_weight={block.use_shuffled_weight}, weight_layout={block.weight_layout})")
    s.add("kernel", f"{block.kernel} (SGLang --moe-runner-backend {block.moe_runner_backend})")
    s.add("source experts were", block.source_kind.upper())
    s.add("output format", f"{block.format} (format version {block.format_version})")

    index_path = path / output_format.INDEX_NAME
    if index_path.exists():
        weight_map = json.loads(index_path.read_text()).get("weight_map", {})
        s.add("non-expert tensors", f"{len(weight_map)} in {len(set(weight_map.values()))} shard(s)")

    for entry in block.shapes:
        if entry.format == "presharded":
            _presharded_lines(s, path, entry, block)
            continue
        files = sorted((path / entry.dir).glob("rank-*-part-*.safetensors"))
        expected = entry.tp * entry.parts_per_rank
        s.add(f"shape {entry.parallel.label}", f"moe_tp {entry.moe_tp}, ep {entry.ep}, I_p {entry.padded_intermediate_size}, "
              f"{entry.experts_per_rank} experts/rank, {entry.parts_per_rank} part(s)/rank, {len(files)}/{expected} files")
        first = path / output_format.rank_part_file_name(entry.parallel, 0, 0)
        if first.exists():
            header = read_header(first)
            seen = set()
            for info in header.tensors:
                parsed = output_format.parse_expert_tensor_name(info.name)
                if parsed and parsed[1] not in seen:
                    seen.add(parsed[1])
                    s.add(f"  {parsed[1]}", f"{info.dtype} {list(info.shape)}")

    work = path / output_format.WORK_DIR
    try:
        manifest = Manifest.load(path)
    except MMConvertError as exc:
        s.add("manifest", f"MISSING or unreadable ({exc})")
        s.data["manifest"] = {"error": str(exc)}
    else:
        missing = [f.path for f in manifest.files if not (path / f.path).is_file()]
        wrong = [f.path for f in manifest.files if (path / f.path).is_file() and (path / f.path).stat().st_size != f.size]
        state = "complete" if not missing and not wrong else f"{len(missing)} missing, {len(wrong)} wrong size"
        s.add("manifest", f"{state}: {len(manifest.files)} files, {human_bytes(sum(f.size for f in manifest.files))} "
              f"(sizes checked; `validate` checks hashes)")
        src = manifest.source
        s.data["manifest"] = {"files": len(manifest.files), "bytes": sum(f.size for f in manifest.files),
                              "missing": missing, "wrong_size": wrong, "source": asdict(src),
                              "validation": {k: asdict(v) for k, v in manifest.validation.items()}}
        s.add("source", f"{src.repo_id or src.path}" + (f" @ {src.revision}" if src.revision else ""))
        if manifest.validation:
            for key, result in sorted(manifest.validation.items()):
                s.add(f"validation {key}", result.line())
        else:
            s.add("validation", "not run yet")
    if work.exists() and (work / "fingerprint.json").exists():
        s.add("in progress", f"an unfinished conversion is staged in {work}")
    s.data["in_progress"] = bool(work.exists() and (work / "fingerprint.json").exists())
    return s
