"""The safetensors file format: strict header parsing and header encoding.

A safetensors file is `u64 little-endian header length | JSON header | data`. Checkpoints from
the Hub are untrusted input, so the header is checked as strictly as the reference library does
(and a little more): every error names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_convert.errors import MMConvertError, SourceError

# The reference implementation refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_RANK = 8
HEADER_ALIGNMENT = 8

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "I16": (torch.int16, 2),
    "I32": (torch.int32, 4),
    "I64": (torch.int64, 8),
    "BOOL": (torch.bool, 1),
}
TORCH_TO_NAME = {dt: name for name, (dt, _) in DTYPES.items()}

# Hugging Face's sharded-checkpoint index (sources and the experts format's output alike).
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its name, dtype, shape and where its bytes start in the data
    section. The one record of a tensor's layout: headers read (`TensorInfo` adds the file) and
    written, plans (`plan.build.PlannedTensor` adds where the bytes come from), synthetic sources."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # within the data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class TensorInfo(TensorEntry):
    """Where one tensor's bytes sit in a file, as its header says (already validated)."""

    path: Path = Path()
    data_start: int = 0  # the file's data section, after the header

    @property
    def start(self) -> int:
        """Absolute byte offset in the file."""
        return self.data_start + self.offset


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None
    header_bytes: int  # length of the JSON header, without the 8-byte length prefix
    header_sha256: str
    file_size: int


def _reject_duplicate_keys(path: Path):
    def hook(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise SourceError(f"{path}: header lists tensor {key!r} twice")
            seen[key] = value
        return seen

    return hook


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading any tensor data."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path}: truncated safetensors file ({file_size} bytes, no header length)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES:
                raise SourceError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + header_len > file_size:
                raise SourceError(
                    f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys(path))
    except MMConvertError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SourceError(f"{path}: header is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: header is not a JSON object")

    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise SourceError(f"{path}: __metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors = [_parse_entry(path, name, entry, data_start, data_size) for name, entry in obj.items()]

    # Like the reference loader: tensors must tile the data section exactly, no overlap, no gap.
    cursor = 0
    previous = None
    for info in sorted(tensors, key=lambda t: (t.start, t.nbytes)):
        begin = info.start - data_start
        if begin < cursor:
            raise SourceError(f"{path}: tensor {info.name} overlaps tensor {previous} in the data section")
        if begin > cursor:
            raise SourceError(f"{path}: tensor {info.name} starts at data byte {begin}, leaving a gap after {cursor}")
        cursor = begin + info.nbytes
        previous = info.name
    if cursor != data_size:
        raise SourceError(f"{path}: {data_size - cursor} unexpected bytes after the last tensor")

    return SafetensorsHeader(
        path=path,
        tensors=tuple(tensors),
        metadata=metadata,
        header_bytes=header_len,
        header_sha256=hashlib.sha256(raw).hexdigest(),
        file_size=file_size,
    )


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: tensor {name}: header entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPES:
        raise SourceError(f"{path}: tensor {name}: unsupported dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise SourceError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SourceError(f"{path}: tensor {name}: data_offsets {offsets!r} are not [begin, end] with begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise SourceError(
            f"{path}: tensor {name}: dtype {dtype} and shape {shape} need {expected} bytes "
            f"but its offsets span {end - begin}"
        )
    if end > data_size:
        raise SourceError(
            f"{path}: tensor {name} ends at data byte {end}, past the end of the file "
            f"({data_size} data bytes): the file is truncated or corrupt"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, path, data_start)


def encode_header(entries: list[TensorEntry] | tuple[TensorEntry, ...], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length prefix plus the JSON header, padded with spaces to 8-byte alignment.

    Entries must already tile the data section (the plan computes offsets before any byte moves).
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = metadata
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.offset, e.offset + e.nbytes]}
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    return len(text).to_bytes(8, "little") + text


def encode_header_exact(entries: list[TensorEntry] | tuple[TensorEntry, ...], length: int) -> bytes:
    """A metadata-free header padded with spaces to exactly `length` bytes (length prefix included):
    the header written in place of a placeholder of that length once the real names are known."""
    obj = {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.offset, e.offset + e.nbytes]} for e in entries}
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if 8 + len(text) > length:
        raise ValueError(f"header of {8 + len(text)} bytes does not fit the {length} reserved")
    text += b" " * (length - 8 - len(text))
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage, without copying (no numpy needed)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    array = (ctypes.c_char * n).from_address(t.data_ptr())
    array._owner = t  # the view keeps the tensor (and so its storage) alive
    return memoryview(array).cast("B")


def pread_into(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    """Fill `view` with bytes from `fd` at `offset`; a short file is an error naming the tensor."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise SourceError(f"{path}: tensor {name}: file ended after {done} of {total} bytes")
        done += n


class TensorFile:
    """One safetensors file, header validated, tensors read on demand (the validators' reader)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header = read_header(self.path)
        self.tensors = {t.name: t for t in self.header.tensors}
        self._fd: int | None = None

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata or {}

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.path}: missing tensor {name}")
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        pread_into(self._fd_open(), tensor_bytes(out), info.start, self.path, name)
        return out

    def _fd_open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Items `[start, stop)` along the first dimension: one contiguous read, no whole-tensor copy."""
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.path}: missing tensor {name}")
        if not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"{name}: slice [{start}, {stop}) outside {info.shape[0]}")
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        out = torch.empty((stop - start, *info.shape[1:]), dtype=info.torch_dtype)
        pread_into(self._fd_open(), tensor_bytes(out), info.start + start * row_bytes, self.path, name)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
