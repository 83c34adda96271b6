"""Where a rank's tensor stream goes (convert/transform.py): the planned files that rank produces.

`FileSink` writes them (both output formats), each front to back under its staged name, checking
that every piece lands inside the planned tensor it belongs to; presharded files get their
content keys as they stream (see the class). `HashSink` only hashes (presharded: the content keys
of the small non-expert tensors, before the layout is fixed, so equal contents are stored once).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

import torch

from mm_convert.fsutil import FileRecord
from mm_convert.plan.build import PlannedFile
from mm_convert.plan.presharded import content_hasher
from mm_convert.read.safetensors_file import DTYPES, TensorEntry, encode_header_exact, tensor_bytes
from mm_convert.plan.sglang_state import RankTensor
from mm_convert.write.workarea import StagedFile, WorkDir


class _Open:
    """A file being filled: its staged writer (None when only its keys are wanted) and progress."""

    def __init__(self, planned: PlannedFile, writer: StagedFile | None):
        self.planned = planned
        self.writer = writer
        self.next_tensor = 0
        self.done_bytes = 0  # of the current tensor
        self.start = 0  # where the current tensor starts in the file
        self.position = len(planned.header)
        self.hasher = None
        self.keys: list[str] = []  # one per planned tensor (content-keyed files)
        self.kept: list[TensorEntry] = []  # the header's entries, real keys and final offsets


class FileSink:
    """The planned files one rank writes; each tensor is filled by the stream tensor named `ref`.

    A `content_keys` file (presharded) is written behind a placeholder header: each tensor's content
    hash is taken as it streams, a tensor whose content the file already holds is taken back (the
    file keeps one copy), and when the file is complete its header is rewritten in place with the
    real keys. Files in `keys_only` are not written at all: only their keys are computed (a `--ranks`
    subset still needs every file's keys for checksum.json).
    """

    def __init__(self, work: WorkDir, files: Iterable[PlannedFile], on_bytes: Callable[[int], None],
                 keys_only: Iterable[PlannedFile] = ()):
        self.work = work
        keys_only = list(keys_only)
        self.files = list(files) + keys_only
        self.write_paths = {f.path for f in self.files} - {f.path for f in keys_only}
        self.on_bytes = on_bytes
        self.route = {t.ref or t.name: (fi, ti) for fi, f in enumerate(self.files) for ti, t in enumerate(f.tensors)}
        self.open: dict[int, _Open] = {}
        self.records: list[FileRecord] = []
        self.keys: dict[str, list[str]] = {}  # path -> content key of each planned tensor
        self.finished: set[str] = set()
        # A finished file is completed (header, fsync, sha256 read back, rename) on another thread,
        # so this rank's next file streams meanwhile instead of the whole pipeline waiting.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mm-convert-finish")
        self._finishing: list[tuple[StagedFile, Future]] = []
        self._lock = threading.Lock()
        for fi, f in enumerate(self.files):
            if not f.tensors:
                self._finish(self._file(fi))

    def wants(self, name: str) -> bool:
        return name in self.route

    def _file(self, fi: int) -> _Open:
        state = self.open.get(fi)
        if state is None:
            f = self.files[fi]
            writer = None
            if f.path in self.write_paths:
                writer = self.work.open(f.path, None if f.content_keys else f.size, header_last=f.content_keys)
                header = f.header
                writer.write(header)  # for content-keyed files a placeholder of the final length
                self.on_bytes(len(header))
            state = self.open[fi] = _Open(f, writer)
        return state

    def write(self, name: str, data: torch.Tensor) -> None:
        fi, ti = self.route[name]
        state = self._file(fi)
        f = state.planned
        if ti != state.next_tensor:
            raise RuntimeError(f"{f.path}: {name} arrived before {f.tensors[state.next_tensor].ref} (stream out of order)")
        tensor = f.tensors[ti]
        view = tensor_bytes(data.contiguous())
        if state.done_bytes == 0:
            state.start = state.position
            if f.content_keys:
                state.hasher = content_hasher(str(DTYPES[tensor.dtype][0]), tensor.shape)
        if state.done_bytes + len(view) > tensor.nbytes:
            raise RuntimeError(f"{f.path}: {name} overran its planned bytes")
        if not f.content_keys and state.start != len(f.header) + tensor.offset:
            raise RuntimeError(f"{f.path}: wrote {name} where the plan has {tensor.name}")
        if state.hasher is not None:
            state.hasher.update(view)
        if state.writer is not None:
            state.writer.write(view)
            self.on_bytes(len(view))
        state.done_bytes += len(view)
        state.position += len(view)
        if state.done_bytes == tensor.nbytes:
            self._tensor_done(state, tensor)
            if state.next_tensor == len(f.tensors):
                self._finish(state)
                del self.open[fi]

    def _tensor_done(self, state: _Open, tensor) -> None:
        state.done_bytes = 0
        state.next_tensor += 1
        if not state.planned.content_keys:
            return
        key = state.hasher.hexdigest()
        state.hasher = None
        state.keys.append(key)
        if any(e.name == key for e in state.kept):
            # The file holds this content already: keep one copy (SGLang's dump stores a content once).
            if state.writer is not None:
                state.writer.truncate(state.start)
            state.position = state.start
            return
        state.kept.append(TensorEntry(key, tensor.dtype, tensor.shape, state.start - len(state.planned.header)))

    def _finish(self, state: _Open) -> None:
        f = state.planned
        self.finished.add(f.path)
        if f.content_keys:
            self.keys[f.path] = state.keys
        if state.writer is None:
            return
        header = encode_header_exact(state.kept, len(f.header)) if f.content_keys else None
        keys = state.keys if f.content_keys else None
        writer = state.writer
        self._finishing.append((writer, self._finisher.submit(self._complete, writer, header, keys)))

    def _complete(self, writer: StagedFile, header: bytes | None, keys: list[str] | None) -> None:
        record = writer.finish(header, keys)
        with self._lock:
            self.records.append(record)

    def _wait(self) -> BaseException | None:
        error = None
        for _, future in self._finishing:
            exc = future.exception()
            error = error or exc
        self._finisher.shutdown(wait=True)
        return error

    def close(self) -> None:
        error = self._wait()
        if error is not None:
            raise error
        for f in self.files:
            if f.path not in self.finished:
                raise RuntimeError(f"{f.path}: not every planned tensor was written")

    def abort(self) -> None:
        self._wait()
        for state in self.open.values():
            if state.writer is not None:
                state.writer.abort()
        self.open.clear()


class HashSink:
    """SGLang's content hash (`presharded.content_hasher`) of each tensor it is given, by name."""

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
        hasher.update(view)  # type: ignore[attr-defined]
        done += len(view)
        self.on_bytes(len(view))
        if done > t.nbytes:
            raise RuntimeError(f"{name}: {done} bytes for a tensor of {t.nbytes}")
        if done == t.nbytes:
            self.keys[name] = hasher.hexdigest()  # type: ignore[attr-defined]
            self._running.pop(name, None)
        else:
            self._running[name] = (hasher, done)

    def close(self) -> None:
        missing = [name for name in self.tensors if name not in self.keys]
        if missing:
            raise RuntimeError(f"{missing[0]}: never hashed")

    def abort(self) -> None:
        self._running.clear()
