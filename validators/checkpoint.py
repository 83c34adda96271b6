"""A converted checkpoint as the validators see it: config block, manifest, per-rank tensor files.

Reads through the output format's names and the strict safetensors reader; imports nothing that
writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from convert import model, output_format
from convert.errors import ConvertError
from convert.fsutil import read_json_object
from convert.manifest import Manifest
from convert.model import ModelShape
from convert.output_format import ConfigBlock, ShapeEntry
from convert.parallel import RankGeometry
from convert.profiles import PROFILES, Profile
from convert.safetensors_file import TensorFile


@dataclass(frozen=True)
class RankLayer:
    """One rank's four kernel-ready tensors for one layer, exactly as stored."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor


class ConvertedCheckpoint:
    def __init__(self, root: Path, config: dict, block: ConfigBlock, shape: ModelShape, profile: Profile):
        self.root = root
        self.config = config
        self.block = block
        self.shape = shape
        self.profile = profile
        self._files: dict[Path, TensorFile] = {}

    @classmethod
    def open(cls, root: str | Path) -> "ConvertedCheckpoint":
        root = Path(root)
        config_path = root / output_format.CONFIG_NAME
        config = read_json_object(config_path)
        block = ConfigBlock.from_dict(config.get(output_format.CONFIG_BLOCK_KEY), str(config_path))
        shape = model.read_model_shape(config, str(config_path))
        profile = PROFILES.get(block.profile)
        if profile is None:
            raise ConvertError(f"{config_path}: unknown profile {block.profile!r} in the {output_format.CONFIG_BLOCK_KEY} block")
        return cls(root, config, block, shape, profile)

    def weight_map(self) -> dict[str, str]:
        """The standard shards' index: non-expert tensor name -> file."""
        weight_map = read_json_object(self.root / output_format.INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{self.root / output_format.INDEX_NAME}: no weight_map")
        return weight_map

    def manifest(self) -> Manifest:
        return Manifest.load(self.root)

    def ranks(self, entry: ShapeEntry) -> list[RankGeometry]:
        return entry.parallel.ranks(self.shape)

    def part_path(self, entry: ShapeEntry, rank: int, part: int) -> Path:
        return self.root / output_format.rank_part_file_name(entry.parallel, rank, part)

    def file(self, path: Path) -> TensorFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = TensorFile(path)
        return f

    def part_of_layer(self, entry: ShapeEntry, rank: int, layer: int) -> Path:
        """The part file of `rank` holding `layer` (found by header, so a mis-numbered part still reads)."""
        name = output_format.expert_tensor_name(layer, "w13_weight")
        for part in range(entry.parts_per_rank):
            path = self.part_path(entry, rank, part)
            if path.exists() and name in self.file(path).tensors:
                return path
        raise ConvertError(f"{self.root / entry.dir}: rank {rank} has no part holding layer {layer}")

    def rank_layer(self, entry: ShapeEntry, rank: int, layer: int, local: range | None = None) -> RankLayer:
        """A rank's tensors for one layer; `local` picks a range of its local experts (one contiguous read)."""
        f = self.file(self.part_of_layer(entry, rank, layer))
        local = local if local is not None else range(entry.experts_per_rank)

        def get(kind: output_format.ExpertTensorKind) -> torch.Tensor:
            return f.read_slice(output_format.expert_tensor_name(layer, kind), local.start, local.stop)

        return RankLayer(get("w13_weight"), get("w13_weight_scale_inv"), get("w2_weight"), get("w2_weight_scale_inv"))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "ConvertedCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
