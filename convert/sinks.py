"""Where a rank's tensor stream goes (convert/transform.py): planned files, or content hashes.

- `FileSink` writes the planned files one rank produces (both output formats), each front to
  back under its staged name, checking that every piece lands inside the planned tensor it
  belongs to; with `verify_keys` it also re-hashes each stored tensor and compares it with the
  content hash it is stored under (presharded: the key was computed by the hashing pass, so a
  source that changed in between is caught here).
- `HashSink` computes SGLang's content hash of every tensor it is given.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from convert.errors import ConvertError
from convert.fsutil import FileRecord
from convert.plan import PlannedFile
from convert.presharded import content_hasher
from convert.safetensors_file import DTYPES, tensor_bytes
from convert.sglang_state import RankTensor
from convert.writer import StagedFile, WorkDir


class FileSink:
    """The planned files one rank writes; each tensor is filled by the stream tensor named `ref`."""

    def __init__(self, work: WorkDir, files: Iterable[PlannedFile], on_bytes: Callable[[int], None],
                 verify_keys: bool = False):
        self.work = work
        self.files = list(files)
        self.on_bytes = on_bytes
        self.verify_keys = verify_keys
        self.route = {t.ref or t.name: (fi, ti) for fi, f in enumerate(self.files) for ti, t in enumerate(f.tensors)}
        self.writers: dict[int, StagedFile] = {}
        self.next_tensor = [0] * len(self.files)
        self.hasher = None
        self.records: list[FileRecord] = []
        for fi, f in enumerate(self.files):
            if not f.tensors:
                self._writer(fi)
                self._finish(fi)

    def wants(self, name: str) -> bool:
        return name in self.route

    def _writer(self, fi: int) -> StagedFile:
        w = self.writers.get(fi)
        if w is None:
            f = self.files[fi]
            w = self.writers[fi] = self.work.open(f.path, f.size)
            header = f.header
            w.write(header)
            self.on_bytes(len(header))
        return w

    def write(self, name: str, data: torch.Tensor) -> None:
        fi, ti = self.route[name]
        f = self.files[fi]
        if ti != self.next_tensor[fi]:
            raise RuntimeError(f"{f.path}: {name} arrived before {f.tensors[self.next_tensor[fi]].ref} (stream out of order)")
        w = self._writer(fi)
        tensor = f.tensors[ti]
        start = len(f.header) + tensor.offset
        end = start + tensor.nbytes
        if not start <= w.written < end:
            raise RuntimeError(f"{f.path}: wrote {name} where the plan has {tensor.name}")
        view = tensor_bytes(data.contiguous())
        if self.verify_keys:
            if w.written == start:
                self.hasher = content_hasher(str(DTYPES[tensor.dtype][0]), tensor.shape)
            self.hasher.update(view)
        w.write(view)
        self.on_bytes(len(view))
        if w.written > end:
            raise RuntimeError(f"{f.path}: {name} overran its planned bytes")
        if w.written == end:
            if self.verify_keys and self.hasher.hexdigest() != tensor.name:
                raise ConvertError(
                    f"{f.path}: {name} no longer hashes to {tensor.name} (its content when this conversion "
                    "planned the files): the source changed during the conversion; rerun with --overwrite")
            self.next_tensor[fi] += 1
            if self.next_tensor[fi] == len(f.tensors):
                self._finish(fi)

    def _finish(self, fi: int) -> None:
        self.records.append(self.writers.pop(fi).finish())

    def close(self) -> None:
        for fi, f in enumerate(self.files):
            if self.next_tensor[fi] != len(f.tensors):
                raise RuntimeError(f"{f.path}: {f.tensors[self.next_tensor[fi]].ref} was never written")

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        self.writers.clear()


class HashSink:
    """SGLang's content hash (`presharded.content_hasher`) of each given tensor, by name."""

    def __init__(self, tensors: Iterable[RankTensor], on_bytes: Callable[[int], None] = lambda n: None):
        self.tensors = {t.name: t for t in tensors}
        self.on_bytes = on_bytes
        self.keys: dict[str, str] = {}
        self._running: dict[str, tuple[object, int]] = {}

    def wants(self, name: str) -> bool:
        return name in self.tensors

    def write(self, name: str, data: torch.Tensor) -> None:
        t = self.tensors[name]
        hasher, done = self._running.get(name) or (content_hasher(t.torch_dtype_name, t.shape), 0)
        view = tensor_bytes(data.contiguous())
        hasher.update(view)
        done += len(view)
        self.on_bytes(len(view))
        if done > t.nbytes:
            raise RuntimeError(f"{name}: {done} bytes for a tensor of {t.nbytes}")
        if done == t.nbytes:
            self.keys[name] = hasher.hexdigest()
            self._running.pop(name, None)
        else:
            self._running[name] = (hasher, done)

    def close(self) -> None:
        for name, t in self.tensors.items():
            if name not in self.keys:
                if t.nbytes == 0:
                    self.keys[name] = content_hasher(t.torch_dtype_name, t.shape).hexdigest()
                else:
                    raise RuntimeError(f"{name}: never hashed")

    def abort(self) -> None:
        self._running.clear()
