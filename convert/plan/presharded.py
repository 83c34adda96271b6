"""SGLang 0.5.23's `--load-format presharded` folder (SPEC section 10), computed without SGLang.

Facts read in sglang 0.5.23's `srt/model_loader/loader.py`, class `PreshardedModelLoader`
(L1721-2541; docs/research/sglang-0.5.23.md has the line-by-line notes), and proven by loading
with SGLang's own loader in the SGLang tier (tests/parity):

- A launch looks for `ROOT/TP-{tp}-sig-{h16}/` with `h16 = sha1(json.dumps(shard_config,
  sort_keys=True))[:16]` (`_build_subfolder_name`); `shard_config` holds the parallel settings and a
  structural signature of the model as built (`_collect_shard_config`, `_compute_structural_signature`).
- Each tensor is stored once under its content hash, xxh3_128 over `str(shape) + str(dtype)` and
  then the raw bytes (`_hash_tensor`); tensors held by the same set of ranks share files
  (`model-{id:05d}-common.safetensor`, `model-{id:05d}-rank-000,001.safetensor`) of at most 20 GiB.
- `checksum.json` says which file and key each rank reads for each of its parameters, and each
  rank's checksum: the sum mod 2^64 of the first 8 bytes (big-endian) of
  `xxh3_128(name + ":" + content_hash)` (`_fold_name_content_digest`). `READY` is written last;
  only its existence is read.

Everything here is a pure function of (name, shape, dtype, content hash) lists. mm-convert's own
layout of files differs from SGLang's dump (which SGLang's loader does not read): see `layout`.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import xxhash

from mm_convert import output_format
from mm_convert.plan import sglang_state
from mm_convert.read.safetensors_file import DTYPES
from mm_convert.plan.sglang_state import PreshardedTarget, RankTensor, SourceView

PLAN_VERSION = 1
CHECKSUM_NAME = "checksum.json"
READY_NAME = "READY"
MAX_FILE_BYTES = 20 * 1024**3  # PreshardedModelLoader.MAX_FILE_BYTES
FILE_SUFFIX = ".safetensor"  # sic: SGLang's dump names end in .safetensor
CONTENT_HASH_HEX = 32


# -- hashes --------------------------------------------------------------------------------------


def content_hasher(torch_dtype_name: str, shape: Sequence[int]) -> "xxhash.xxh3_128":
    """A running content hash of one tensor, fed its raw bytes in order (`_hash_tensor`)."""
    h = xxhash.xxh3_128()
    h.update(str(tuple(shape)).encode() + torch_dtype_name.encode())
    return h


def fold(name: str, content_hash: str) -> int:
    """A tensor's share of its rank's checksum (`_fold_name_content_digest`, first 8 bytes, big-endian)."""
    return int.from_bytes(xxhash.xxh3_128((name + ":" + content_hash).encode("utf-8")).digest()[:8], "big")


def rank_checksum(reads: Iterable[tuple[str, str]]) -> str:
    """A rank's checksum over its (parameter name, content hash) pairs: 16 hex digits."""
    total = 0
    for name, content_hash in reads:
        total = (total + fold(name, content_hash)) & 0xFFFFFFFFFFFFFFFF
    return format(total, "016x")


# -- the folder key ------------------------------------------------------------------------------


def structural_signature(rank_states: Sequence[Sequence[RankTensor]]) -> str:
    """SGLang's structural signature of a launch: per rank, sha1 of the sorted (name, shape, dtype)
    of the model as built; over several ranks, sha1 of the list of rank signatures."""
    local = [hashlib.sha1(repr(sorted(t.signature_entry() for t in state)).encode()).hexdigest()[:16]
             for state in rank_states]
    if len(local) == 1:
        return local[0]
    return hashlib.sha1(repr(local).encode()).hexdigest()[:16]


def shard_config(tp: int, ep: int, model_dtype_torch: str, signature: str) -> dict[str, Any]:
    """`_collect_shard_config` for a plain launch: no DP attention, PP, EPLB or redundant experts."""
    return {
        "tp": tp,
        "dp": 1,
        "ep": ep,
        "pp": 1,
        "moe_dense_tp_size": None,
        "moe_dp_size": 1,
        "enable_dp_lm_head": False,
        "enable_fp32_lm_head": False,
        "quantization": "fp8",
        "model_dtype": model_dtype_torch,
        "ep_num_redundant_experts": 0,
        "enable_eplb": False,
        "init_expert_location": "trivial",
        "structural_signature": signature,
    }


def folder_name(config: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"TP-{config['tp']}-sig-{digest}"


@dataclass(frozen=True)
class LaunchState:
    """What every rank of a launch holds, and the folder SGLang looks for it in."""

    states: tuple[tuple[RankTensor, ...], ...]
    shard_config: dict[str, Any]
    folder: str  # relative to the model folder: <root named for backend and GPU>/TP-{tp}-sig-{h16}


def launch_state(source: SourceView, target: PreshardedTarget) -> LaunchState:
    """Every rank's tensors (stream order) and the folder key, from a source's config and headers."""
    parallel = target.parallel
    states = tuple(sglang_state.rank_state(source, target, r) for r in range(parallel.tp))
    dtype = str(DTYPES[sglang_state.model_dtype(source.config)][0])
    config = shard_config(parallel.tp, parallel.ep, dtype, structural_signature(states))
    root = output_format.presharded_root(sglang_state.MOE_RUNNER_BACKEND, target.gpu_arch)
    return LaunchState(states, config, f"{root}/{folder_name(config)}")


# -- the file layout -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """One stored copy of a content, and which (rank, parameter name) hold it."""

    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int
    holders: tuple[tuple[int, str], ...]  # (rank, parameter name), in rank then stream order

    @property
    def producer(self) -> tuple[int, str]:
        """The first holder: the rank stream that writes the bytes."""
        return self.holders[0]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for r, _ in self.holders}))


@dataclass(frozen=True)
class LayoutFile:
    name: str
    ranks: tuple[int, ...]
    is_common: bool
    tensors: tuple[StoredTensor, ...]

    @property
    def writer_rank(self) -> int:
        return self.ranks[0]

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def file_name(file_id: int, ranks: tuple[int, ...], is_common: bool) -> str:
    if is_common:
        return f"model-{file_id:05d}-common{FILE_SUFFIX}"
    return f"model-{file_id:05d}-rank-{','.join(f'{r:03d}' for r in ranks)}{FILE_SUFFIX}"


def layer_group(name: str, num_layers: int) -> int:
    """The layer a parameter belongs to: -1 before the first layer (the embedding), num_layers after."""
    parts = name.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return -1 if "embed" in name else num_layers


def layout(rank_states: Sequence[Sequence[RankTensor]], identities: Sequence[Sequence[Hashable]],
           num_layers: int, max_file_bytes: int = MAX_FILE_BYTES) -> tuple[LayoutFile, ...]:
    """Store each content once, in files shared by exactly the ranks that hold it, one layer at a time.

    `identities[r][i]` names the content of `rank_states[r][i]`: equal identities are proven equal
    contents (the same recipe over the same source tensors, or all zeros of one shape), so they are
    stored once. Files follow the layers (the embedding, each layer, then the final norm and
    lm_head), so a conversion streams the source once, layer by layer, and a file's tensors keep
    the order in which their producing rank meets them: each file is written front to back. A file
    closes before a tensor that would take it past `max_file_bytes`.
    """
    world = len(rank_states)
    holders: dict[Hashable, list[tuple[int, str]]] = {}
    first: dict[Hashable, RankTensor] = {}
    for r, (state, ids) in enumerate(zip(rank_states, identities)):
        for t, identity in zip(state, ids):
            holders.setdefault(identity, []).append((r, t.name))
            if identity in first and (first[identity].dtype, first[identity].shape) != (t.dtype, t.shape):
                raise ValueError(f"{first[identity].name} and {t.name} share a content but not its dtype and shape")
            first.setdefault(identity, t)
    groups: dict[tuple[int, tuple[int, ...]], list[StoredTensor]] = {}
    for identity, hs in holders.items():  # dict order: the producing rank's stream order, ranks ascending
        t = first[identity]
        stored = StoredTensor(t.dtype, t.shape, t.nbytes, tuple(hs))
        groups.setdefault((layer_group(t.name, num_layers), stored.ranks), []).append(stored)
    files: list[LayoutFile] = []
    for group, ranks in sorted(groups, key=lambda g: (g[0], g[1][0], -len(g[1]), g[1])):
        is_common = ranks == tuple(range(world))
        current: list[StoredTensor] = []
        size = 0
        for stored in groups[(group, ranks)]:
            if current and size + stored.nbytes > max_file_bytes:
                files.append(LayoutFile(file_name(len(files), ranks, is_common), ranks, is_common, tuple(current)))
                current, size = [], 0
            current.append(stored)
            size += stored.nbytes
        if current:
            files.append(LayoutFile(file_name(len(files), ranks, is_common), ranks, is_common, tuple(current)))
    return tuple(files)


def checksum_json(files: Sequence[LayoutFile], keys: Sequence[Sequence[str]], world_size: int,
                  config: dict[str, Any]) -> dict[str, Any]:
    """The `checksum.json` SGLang's loader reads (`_build_dump_plan` plus `shard_config`).

    `keys[f][i]` is the content hash of `files[f].tensors[i]`. Two stored tensors of one file that
    turn out to hold the same content are one entry (the file stores it once)."""
    out_files, rank_to_reads = [], {}
    for f, file_keys in zip(files, keys):
        merged: dict[str, dict[str, list[str]]] = {}
        sizes: dict[str, int] = {}
        for t, key in zip(f.tensors, file_keys):
            sizes[key] = t.nbytes
            for r, name in t.holders:
                merged.setdefault(key, {}).setdefault(str(r), []).append(name)
        out_files.append({
            "filename": f.name,
            "writer_rank": f.writer_rank,
            "rank_list": None if f.is_common else list(f.ranks),
            "is_common": f.is_common,
            "tensors": [{"stored_key": key, "size": sizes[key], "rank_to_names": {r: sorted(ns) for r, ns in names.items()}}
                        for key, names in merged.items()],
        })
        for key, names in merged.items():
            for r, ns in names.items():
                for name in sorted(ns):
                    rank_to_reads.setdefault(r, []).append({"filename": f.name, "stored_key": key, "name": name,
                                                            "is_extra": False})
    checksums = {str(r): rank_checksum((e["name"], e["stored_key"]) for e in rank_to_reads.get(str(r), []))
                 for r in range(world_size)}
    return {
        "version": PLAN_VERSION,
        "world_size": world_size,
        "files": out_files,
        "rank_to_reads": rank_to_reads,
        "rank_checksums": checksums,
        "shard_config": config,
    }


def ready_json(world_size: int, tool: str) -> dict[str, Any]:
    """READY: SGLang writes the time; a fixed 0 here keeps every run's bytes identical (only the
    file's existence is read, `_presharded_ready`)."""
    return {"plan_version": PLAN_VERSION, "world_size": world_size, "created_at": 0, "created_by": tool}


def launch_command(model_path: str, tp: int, ep: int, root: str, backend: str, shell_variable: bool = False) -> str:
    """The `sglang.launch_server` command that serves a presharded folder with no load-time work.

    No `--trust-remote-code`: the transformers release SGLang 0.5.23 pins (5.19) has MiniMax-M2's
    config built in, so the checkpoint's remote code is never run (the SGLang tier runs this command).

    `root` is the folder passed as `presharded_path`, relative to `model_path`. With
    `shell_variable`, `model_path` is the name of a shell variable (for a model card, whose reader
    chooses where the model lives): `--model-path "$MODEL"`, and the JSON in double quotes.
    """
    if shell_variable:
        model = f'"${model_path}"'
        extra = '"{\\"presharded_path\\": \\"$' + model_path + '/' + root + '\\", \\"verify_on_load\\": true}"'
    else:
        model = shlex.quote(model_path)
        extra = shlex.quote(json.dumps({"presharded_path": f"{model_path.rstrip('/')}/{root}", "verify_on_load": True}))
    return " ".join([
        "python -m sglang.launch_server",
        f"--model-path {model}",
        f"--tp-size {tp}",
        *([f"--ep-size {ep}"] if ep > 1 else []),
        f"--moe-runner-backend {backend}",
        "--quantization fp8",
        "--load-format presharded",
        f"--model-loader-extra-config {extra}",
    ])
