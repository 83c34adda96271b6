"""A MiniMax-M2 checkpoint on disk: its index, its headers, lazy access to its tensors.

Opening a source reads only the config, the index and the safetensors headers; every check that
can be made without reading tensor data is made here, before any output is written.
Tensor bytes are read on demand with positioned reads, so nothing holds the whole model.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from mm_convert import model
from mm_convert.errors import SourceError
from mm_convert.fsutil import confined, read_json_object, regular_file_problem
from mm_convert.read.hf_cache import snapshot_of
from mm_convert.model import ModelShape
from mm_convert.read.safetensors_file import INDEX_NAME, TensorInfo, pread_into, read_header, tensor_bytes

SINGLE_FILE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
QUANTISABLE_DTYPES = ("BF16", "F16", "F32")

SourceKind = Literal["fp8", "bf16"]


@dataclass(frozen=True)
class SourceFile:
    """Identity of one source shard: enough to notice that it changed without hashing 230 GB."""

    name: str
    size: int
    mtime_ns: int
    header_sha256: str
    inode: int = 0


class SourceCheckpoint:
    """A validated, lazily read MiniMax-M2 safetensors checkpoint directory."""

    def __init__(
        self,
        root: Path,
        config: dict,
        shape: ModelShape,
        tensors: dict[str, TensorInfo],
        files: tuple[SourceFile, ...],
        kind: SourceKind,
        expert_dtype: str,
    ):
        self.root = root
        self.config = config
        self.shape = shape
        self.tensors = tensors
        self.files = files
        self.kind = kind
        self.expert_dtype = expert_dtype
        self._fds: dict[Path, int] = {}

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike) -> "SourceCheckpoint":
        root = Path(root)
        if not root.is_dir():
            raise SourceError(f"{root}: source is not a directory")
        root = root.resolve()
        config_path = root / "config.json"
        config = read_json_object(config_path)
        shape = model.read_model_shape(config, str(config_path))

        index_map = _index_weight_map(root)
        shard_names = _shard_names(root, index_map)
        tensors: dict[str, TensorInfo] = {}
        files = []
        for name in shard_names:
            path = _inside(root, name, INDEX_NAME)
            header = read_header(path)
            st = path.stat()
            files.append(SourceFile(name, header.file_size, st.st_mtime_ns, header.header_sha256, st.st_ino))
            for info in header.tensors:
                if info.name in tensors:
                    raise SourceError(
                        f"{path}: tensor {info.name} also appears in {tensors[info.name].path.name}"
                    )
                tensors[info.name] = info

        if index_map is not None:
            for tensor_name, file_name in index_map.items():
                info = tensors.get(tensor_name)
                if info is None:
                    raise SourceError(f"{root / file_name}: tensor {tensor_name} is in the index but not in the file")
                if info.path.name != Path(file_name).name:
                    raise SourceError(
                        f"{root / INDEX_NAME}: tensor {tensor_name} is indexed in {file_name} but stored in {info.path.name}"
                    )

        kind, expert_dtype = _check_experts(shape, tensors, config_path)
        _check_quantization_config(config, kind, tensors, config_path)
        _check_router(shape, tensors, config_path)
        _check_names(tensors)
        return cls(root, config, shape, tensors, tuple(files), kind, expert_dtype)

    # -- reading -------------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SourceError(f"{self.root}: missing tensor {name}") from None

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
            self._fds[path] = fd
        return fd

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy a tensor's raw bytes into `out` (a contiguous CPU tensor of exactly that many bytes)."""
        info = self.info(name)
        view = tensor_bytes(out)
        if len(view) != info.nbytes:
            raise ValueError(f"{name}: buffer holds {len(view)} bytes, tensor has {info.nbytes}")
        pread_into(self._fd(info.path), view, info.start, info.path, name)

    def read_chunks(self, name: str, buffer: torch.Tensor) -> Iterator[memoryview]:
        """A tensor's raw bytes, in successive pieces read into `buffer` (reused between pieces)."""
        info = self.info(name)
        view = tensor_bytes(buffer)
        fd = self._fd(info.path)
        for done in range(0, info.nbytes, len(view)):
            n = min(len(view), info.nbytes - done)
            pread_into(fd, view[:n], info.start + done, info.path, name)
            yield view[:n]

    def read_rows(self, name: str, start: int, count: int) -> torch.Tensor:
        """Items `[start, start + count)` along the first dimension (one contiguous read)."""
        info = self.info(name)
        if not info.shape or not 0 <= start <= start + count <= info.shape[0]:
            raise ValueError(f"{name}: rows [{start}, {start + count}) outside {info.shape}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        out = torch.empty((count, *info.shape[1:]), dtype=info.torch_dtype)
        pread_into(self._fd(info.path), tensor_bytes(out), info.start + start * row_bytes, info.path, name)
        return out

    def dtype_of(self, name: str) -> str:
        """The safetensors dtype name of a tensor (SourceError naming the source if it is missing)."""
        return self.info(name).dtype

    def read(self, name: str) -> torch.Tensor:
        """A tensor with its own dtype and shape, freshly read from disk."""
        info = self.info(name)
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SourceCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds --------------------------------------------------------------------------

    def is_expert(self, name: str) -> bool:
        return model.parse_expert_name(name) is not None

    def non_expert_names(self) -> list[str]:
        return [n for n in self.tensors if not self.is_expert(n)]

    def expert_bytes(self) -> int:
        return sum(i.nbytes for n, i in self.tensors.items() if self.is_expert(n))

    def auxiliary_files(self) -> list[str]:
        """Tokenizer, generation config, chat template, licence and remote-code files to copy."""
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_file() and any(fnmatch.fnmatch(entry.name, p) for p in model.AUXILIARY_FILE_PATTERNS):
                _inside(self.root, entry.name, "the source folder")
                found.append(entry.name)
        return found


def _inside(root: Path, name: str, referrer: str) -> Path:
    """A file named by the source (its index, its folder listing), confined to the source folder and
    a regular file (a FIFO would hang the reader, a device would never end). A Hub cache snapshot's
    files are links into the repo's `blobs/`, which is the one other place they may lead."""
    snapshot = snapshot_of(root)
    path = confined(root, name, f"{root / referrer}" if referrer == INDEX_NAME else f"{root}: {referrer}",
                    also_within=snapshot.blobs if snapshot else None)
    problem = regular_file_problem(path)
    if problem:
        raise SourceError(f"{path}: named by {referrer} but {problem}")
    return path


def _index_weight_map(root: Path) -> dict[str, str] | None:
    index_path = root / INDEX_NAME
    if not index_path.exists():
        return None
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SourceError(f"{index_path}: weight_map must map tensor names to file names")
    return weight_map


def _shard_names(root: Path, weight_map: dict[str, str] | None) -> list[str]:
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        if not names:
            raise SourceError(f"{root / INDEX_NAME}: weight_map is empty")
        for name in names:
            _inside(root, name, INDEX_NAME)
        return names
    if (root / SINGLE_FILE_NAME).exists():
        _inside(root, SINGLE_FILE_NAME, "the source folder")
        return [SINGLE_FILE_NAME]
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SourceError(
            f"{root / pickles[0]}: pickle checkpoints are never loaded (they can run code); "
            "use a safetensors source (model.safetensors or model.safetensors.index.json)"
        )
    raise SourceError(f"{root}: no {INDEX_NAME} or {SINGLE_FILE_NAME}")


def _check_experts(shape: ModelShape, tensors: dict[str, TensorInfo], config_path: Path) -> tuple[SourceKind, str]:
    """Every routed expert present exactly as the config says; one weight dtype; scales iff FP8."""
    dtypes: set[str] = set()
    for name, info in tensors.items():
        parsed = model.parse_expert_name(name)
        if parsed is None:
            continue
        if parsed.layer >= shape.num_layers or parsed.expert >= shape.num_experts:
            raise SourceError(
                f"{info.path}: tensor {name} is outside the config "
                f"(num_hidden_layers={shape.num_layers}, num_local_experts={shape.num_experts}; {config_path})"
            )
        if not parsed.is_scale:
            dtypes.add(info.dtype)
    if not dtypes:
        raise SourceError(f"{config_path}: the checkpoint has no routed-expert tensors")
    if len(dtypes) > 1:
        raise SourceError(f"{config_path}: routed experts mix dtypes {sorted(dtypes)}")
    (dtype,) = dtypes
    if dtype == "F8_E4M3":
        kind: SourceKind = "fp8"
    elif dtype in QUANTISABLE_DTYPES:
        kind = "bf16"
    else:
        raise SourceError(f"{config_path}: routed experts have unsupported dtype {dtype} (need F8_E4M3, BF16, F16 or F32)")

    for layer in range(shape.num_layers):
        for expert in range(shape.num_experts):
            for proj, wshape in shape.expert_weight_shapes.items():
                info = _require(tensors, model.expert_weight_name(layer, expert, proj), wshape, config_path)
                sname = model.expert_scale_name(layer, expert, proj)
                sinfo = tensors.get(sname)
                if kind == "fp8":
                    if sinfo is None:
                        raise SourceError(f"{info.path}: missing tensor {sname} (the scale of an FP8 weight)")
                    want = model.scale_shape(wshape)
                    if sinfo.shape != want or sinfo.dtype != "F32":
                        raise SourceError(
                            f"{sinfo.path}: tensor {sname} is {sinfo.dtype} {list(sinfo.shape)}, "
                            f"expected F32 {list(want)} (128x128 blocks)"
                        )
                elif sinfo is not None:
                    raise SourceError(f"{sinfo.path}: tensor {sname} is a scale for a {dtype} weight")
    return kind, dtype


def _require(tensors: dict[str, TensorInfo], name: str, shape: tuple[int, ...], config_path: Path,
             role: str = "") -> TensorInfo:
    """A tensor the config says must exist, with the shape it implies."""
    info = tensors.get(name)
    if info is None:
        raise SourceError(f"{config_path}: missing tensor {name}{role}")
    if info.shape != shape:
        raise SourceError(f"{info.path}: tensor {name} has shape {list(info.shape)}, the config implies {list(shape)}")
    return info


# What an FP8 source's quantization_config must say for its tensors to mean what they do here.
FP8_QUANT_FIELDS = {"quant_method": ("fp8",), "fmt": ("float8_e4m3fn", "e4m3"), "activation_scheme": ("dynamic",)}


def _check_quantization_config(config: dict, kind: SourceKind, tensors: dict[str, TensorInfo], config_path: Path) -> None:
    """The config must describe the tensors: SGLang builds the model from the config, not from the bytes."""
    q = config.get("quantization_config")
    if kind != "fp8":
        if isinstance(q, dict) and q.get("quant_method") not in (None,):
            raise SourceError(f"{config_path}: quantization_config.quant_method = {q.get('quant_method')!r}, "
                               "but the routed experts are not quantised")
        return
    if not isinstance(q, dict):
        raise SourceError(f"{config_path}: the experts are FP8 but there is no quantization_config (SGLang would load "
                           "them as plain weights)")
    for name, allowed in FP8_QUANT_FIELDS.items():
        if q.get(name) not in allowed:
            raise SourceError(f"{config_path}: quantization_config.{name} = {q.get(name)!r}; FP8 e4m3 block checkpoints "
                               f"need {' or '.join(map(repr, allowed))}")
    if q.get("weight_block_size") != [model.QUANT_BLOCK, model.QUANT_BLOCK]:
        raise SourceError(f"{config_path}: quantization_config.weight_block_size = {q.get('weight_block_size')!r}; "
                           f"the scales are {model.QUANT_BLOCK}x{model.QUANT_BLOCK} blocks")
    skipped = q.get("modules_to_not_convert") or []
    if not isinstance(skipped, list) or not all(isinstance(m, str) for m in skipped):
        raise SourceError(f"{config_path}: quantization_config.modules_to_not_convert must be a list of names")
    q_proj = tensors.get(model.attention_projection_names(0)[0])
    attention_fp8 = q_proj is not None and q_proj.dtype == "F8_E4M3"
    attention_skipped = any(m.strip(".") in ("self_attn", "model.layers.0.self_attn") for m in skipped)
    if q_proj is not None and attention_fp8 == attention_skipped:
        raise SourceError(f"{config_path}: quantization_config.modules_to_not_convert "
                           f"{'lists' if attention_skipped else 'does not list'} self_attn, but {q_proj.name} is "
                           f"{q_proj.dtype}")


def _check_names(tensors: dict[str, TensorInfo]) -> None:
    """No source tensor may carry a name an output tensor is given (the output would hold two)."""
    from mm_convert.output_format import parse_expert_tensor_name

    for name, info in tensors.items():
        if parse_expert_tensor_name(name) is not None:
            raise SourceError(f"{info.path}: tensor {name} is named like a converted expert tensor; refused "
                               "(is this folder already a conversion?)")


def _check_router(shape: ModelShape, tensors: dict[str, TensorInfo], config_path: Path) -> None:
    for layer in range(shape.num_layers):
        for name, want in (
            (model.router_weight_name(layer), (shape.num_experts, shape.hidden_size)),
            (model.router_bias_name(layer), (shape.num_experts,)),
        ):
            info = _require(tensors, name, want, config_path, f" (the router of layer {layer})")
            if info.dtype not in ("F32", "BF16", "F16"):
                raise SourceError(f"{info.path}: tensor {name} has unsupported dtype {info.dtype}")

