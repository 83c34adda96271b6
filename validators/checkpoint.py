"""A converted checkpoint as the validators see it: config block, manifest, per-rank tensor files.

Reads through the output format's names and the strict safetensors reader; imports nothing that
writes. A rank's tensors are found by name in either format: in the `experts` format by the part
files' headers (and the standard shards' index for the router), in the `presharded` format through
the folder's `checksum.json` (which file and key each rank reads for each parameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mm_convert import model, output_format
from mm_convert.plan import presharded
from mm_convert.errors import CheckFailed
from mm_convert.fsutil import read_json_object
from mm_convert.write.manifest import Manifest
from mm_convert.model import ModelShape
from mm_convert.output_format import ConfigBlock, ShapeEntry
from mm_convert.plan.parallel import RankGeometry
from mm_convert.transform.profiles import PROFILES, Profile
from mm_convert.read.safetensors_file import TensorFile


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
        self._reads: dict[str, dict[tuple[int, str], tuple[str, str]]] = {}

    @classmethod
    def open(cls, root: str | Path) -> "ConvertedCheckpoint":
        root = Path(root)
        config_path = root / output_format.CONFIG_NAME
        config = read_json_object(config_path)
        block = ConfigBlock.from_dict(config.get(output_format.CONFIG_BLOCK_KEY), str(config_path))
        shape = model.read_model_shape(config, str(config_path))
        profile = PROFILES.get(block.profile)
        if profile is None:
            raise CheckFailed(f"{config_path}: unknown profile {block.profile!r} in the {output_format.CONFIG_BLOCK_KEY} block")
        return cls(root, config, block, shape, profile)

    def weight_map(self) -> dict[str, str]:
        """The standard shards' index: non-expert tensor name -> file."""
        weight_map = read_json_object(self.root / output_format.INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckFailed(f"{self.root / output_format.INDEX_NAME}: no weight_map")
        return weight_map

    def manifest(self) -> Manifest:
        return Manifest.load(self.root)

    def ranks(self, entry: ShapeEntry) -> list[RankGeometry]:
        """The ranks whose tensors are in the folder (a presharded subset holds only some)."""
        return [entry.parallel.rank(self.shape, r) for r in entry.present_ranks]

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
        raise CheckFailed(f"{self.root / entry.dir}: rank {rank} has no part holding layer {layer}")

    # -- presharded folders ------------------------------------------------------------------------

    def checksum(self, entry: ShapeEntry) -> dict:
        """The folder's checksum.json (CheckFailed naming it when missing or malformed)."""
        return read_json_object(self.root / entry.dir / presharded.CHECKSUM_NAME)

    def reads(self, entry: ShapeEntry) -> dict[tuple[int, str], tuple[str, str]]:
        """(rank, parameter name) -> (file name, stored key), from checksum.json; names confined to the folder."""
        if entry.dir not in self._reads:
            where = self.root / entry.dir / presharded.CHECKSUM_NAME
            table: dict[tuple[int, str], tuple[str, str]] = {}
            try:
                for rank, items in self.checksum(entry)["rank_to_reads"].items():
                    for item in items:
                        name = str(item["filename"])
                        if "/" in name or "\\" in name or name in ("", ".", ".."):
                            raise CheckFailed(f"{where}: file name {name!r} leaves the folder")
                        table[(int(rank), str(item["name"]))] = (name, str(item["stored_key"]))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise CheckFailed(f"{where}: malformed ({type(exc).__name__}: {exc})") from exc
            self._reads[entry.dir] = table
        return self._reads[entry.dir]

    def rank_tensor(self, entry: ShapeEntry, rank: int, name: str, local: range | None = None) -> torch.Tensor:
        """A rank's parameter by name (`local`: items of its first dimension), in either format."""
        if entry.format == "presharded":
            where = self.reads(entry).get((rank, name))
            if where is None:
                raise CheckFailed(f"{self.root / entry.dir}: rank {rank} reads no tensor {name}")
            f = self.file(self.root / entry.dir / where[0])
            key = where[1]
        else:
            parsed = output_format.parse_expert_tensor_name(name)
            if parsed is None:
                raise CheckFailed(f"{self.root / entry.dir}: the experts format stores no {name} per rank")
            f = self.file(self.part_of_layer(entry, rank, parsed[0]))
            key = name
        if local is None:
            return f.read(key)
        return f.read_slice(key, local.start, local.stop)

    def router(self, entry: ShapeEntry, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's router gate and correction bias (float32), as the checkpoint stores them."""
        names = (model.router_weight_name(layer), model.router_bias_name(layer))
        if entry.format == "presharded":
            return tuple(self.rank_tensor(entry, entry.present_ranks[0], n).float() for n in names)  # type: ignore[return-value]
        weight_map = self.weight_map()
        tensors = []
        for name in names:
            if name not in weight_map:
                raise CheckFailed(f"{self.root}: missing tensor {name} (needed to route)")
            tensors.append(self.file(self.root / weight_map[name]).read(name).float())
        return tensors[0], tensors[1]

    def rank_layer(self, entry: ShapeEntry, rank: int, layer: int, local: range | None = None) -> RankLayer:
        """A rank's tensors for one layer; `local` picks a range of its local experts (one contiguous read)."""
        local = local if local is not None else range(entry.experts_per_rank)

        def get(kind: output_format.ExpertTensorKind) -> torch.Tensor:
            return self.rank_tensor(entry, rank, output_format.expert_tensor_name(layer, kind), local)

        return RankLayer(get("w13_weight"), get("w13_weight_scale_inv"), get("w2_weight"), get("w2_weight_scale_inv"))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "ConvertedCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OutputView:
    """The converted checkpoint as SGLang will see it when serving: its config (which decides whether
    attention is FP8, exactly as SGLang's quantisation config decides) and its model shape."""

    def __init__(self, ckpt: ConvertedCheckpoint):
        self.config = ckpt.config
        self.shape = ckpt.shape

    def dtype_of(self, name: str) -> str:
        from mm_convert.plan.sglang_state import model_dtype

        quant = self.config.get("quantization_config") or {}
        skipped = any(m == "self_attn" or f".{m}." in f".{name}." for m in quant.get("modules_to_not_convert") or [])
        if quant.get("quant_method") == "fp8" and ".self_attn." in name and not skipped:
            return "F8_E4M3"
        return model_dtype(self.config)
