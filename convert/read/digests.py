"""Digests of the source tensors a conversion read, kept in the manifest (`source_digests`).

They let `validate` prove, without the source, that the stored tensors undo to exactly what was
read: it undoes the layout from the stored bytes, hashes the result the same way and compares. A
value-preserving tamper (two experts swapped, a rank's tensors moved, a scale doubled and the
manifest's file hashes rewritten to match) then fails.

- an expert projection: one digest per (layer, projection, weight or scale) over every expert in
  order, of the FP8 bytes and fp32 scales the output holds (for a BF16 source: its quantisation);
- any other tensor: one digest of its bytes as read.

xxh3_128 (fast enough to run beside the conversion on every byte).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import xxhash

from mm_convert import model
from mm_convert.read.safetensors_file import tensor_bytes

ALGORITHM = "xxh3_128"


def expert_digest_name(layer: int, proj: str, scale: bool) -> str:
    """The name a projection's digest is kept under: every expert of the layer, in order."""
    return f"model.layers.{layer}.block_sparse_moe.experts.*.{proj}.{'weight_scale_inv' if scale else 'weight'}"


@dataclass
class _Running:
    hasher: "xxhash.xxh3_128"
    next_expert: int = 0
    broken: bool = False


@dataclass
class DigestCollector:
    """Collects digests as a conversion streams; only complete, gap-free ones are kept."""

    num_experts: int
    done: dict[str, str] = field(default_factory=dict)
    on_done: "Callable[[dict[str, str]], None] | None" = None  # told each time a digest completes (to persist it)
    _running: dict[str, _Running] = field(default_factory=dict)
    _tensors: dict[str, "xxhash.xxh3_128"] = field(default_factory=dict)

    def add_experts(self, layer: int, proj: str, experts: range, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """A chunk of experts of one projection, as the output holds them (`[n, ...]`, host or GPU)."""
        for is_scale, data in ((False, weight), (True, scale)):
            name = expert_digest_name(layer, proj, is_scale)
            if name in self.done:
                continue
            run = self._running.setdefault(name, _Running(xxhash.xxh3_128()))
            if experts.start != run.next_expert:
                run.broken = True  # a chunk was skipped (its files were done): this digest comes from elsewhere
                continue
            run.hasher.update(tensor_bytes(data.contiguous().cpu()))
            run.next_expert = experts.stop
            if run.next_expert == self.num_experts and not run.broken:
                self.done[name] = run.hasher.hexdigest()
                del self._running[name]
                if self.on_done:
                    self.on_done(self.done)

    def add_tensor(self, name: str, data: memoryview | bytes, last: bool) -> None:
        """The next bytes of a whole non-expert source tensor, in order; `last` completes it."""
        h = self._tensors.setdefault(name, xxhash.xxh3_128())
        h.update(data)
        if last:
            self.done[name] = self._tensors.pop(name).hexdigest()


def tensor_digest(data: torch.Tensor) -> str:
    """The digest of one whole tensor's bytes."""
    return xxhash.xxh3_128(tensor_bytes(data.contiguous().cpu())).hexdigest()


def expected_names(shape: model.ModelShape) -> list[str]:
    return [expert_digest_name(layer, proj, scale) for layer in range(shape.num_layers)
            for proj in model.PROJECTIONS for scale in (False, True)]
