"""The output checkpoint's format (SPEC section 5): file names, tensor names, the config block.

Other tools and the validators read converted checkpoints through the names defined here; this
is the only module that spells them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mm_convert.errors import CheckFailed
from mm_convert.model import ModelShape
from mm_convert.plan.parallel import ParallelShape
from mm_convert.read import safetensors_file

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
CONFIG_BLOCK_KEY = "mm_convert"
MANIFEST_NAME = "mm_convert.json"
INDEX_NAME = safetensors_file.INDEX_NAME  # the experts format's shard index: Hugging Face's own
SYNTHETIC_KEY = "mm_convert_synthetic"  # in a synthetic source's config.json: cards must not call its weights MiniMax-M2.5
MODEL_CARD_NAME = "README.md"
CHART_NAME = "validation.svg"  # the per-layer error chart the card shows, when validation recorded one
EXPERTS_DIR = "experts"
WORK_DIR = ".mm-convert"  # staging, lock and journal of a conversion in progress
DEFAULT_PART_SIZE = 5 * 10**9  # bytes per file, like the Hub's usual 5 GB shards
MOE_RUNNER_BACKEND = "flashinfer_trtllm_routed"
KERNEL_NAME = "flashinfer.fused_moe.trtllm_fp8_block_scale_routed_moe"

# Output formats. `presharded`: SGLang's own --load-format presharded folder, every rank's whole
# post-processed state (the default for the sglang profile). `experts`: the experts alone, one
# folder per parallel shape, beside standard shards of everything else (FlashInfer users, and the
# trtllm profile, which SGLang does not hold).
OutputFormat = Literal["presharded", "experts"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("presharded", "experts")
PRESHARDED_ROOT_PREFIX = "presharded-"

ExpertTensorKind = Literal["w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"]
EXPERT_TENSOR_KINDS: tuple[ExpertTensorKind, ...] = (
    "w13_weight",
    "w13_weight_scale_inv",
    "w2_weight",
    "w2_weight_scale_inv",
)
EXPERT_DTYPES: dict[ExpertTensorKind, str] = {
    "w13_weight": "F8_E4M3",
    "w13_weight_scale_inv": "F32",
    "w2_weight": "F8_E4M3",
    "w2_weight_scale_inv": "F32",
}


def shard_file_name(index: int, count: int) -> str:
    """Standard Hugging Face shard name, 1-based: `model-00001-of-00003.safetensors`."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def shape_dir(shape: ParallelShape) -> str:
    return f"{EXPERTS_DIR}/{shape.dirname}"


def rank_part_file_name(shape: ParallelShape, rank: int, part: int) -> str:
    return f"{shape_dir(shape)}/rank-{rank}-part-{part}.safetensors"


def presharded_root(moe_runner_backend: str, gpu_arch: str) -> str:
    """The folder to pass as SGLang's `presharded_path`, named for the backend and GPU it was
    written for: not SGLang's default `<model_path>/presharded`, so a launch with another backend
    (which the folder key cannot tell apart) never finds it by default."""
    return f"{PRESHARDED_ROOT_PREFIX}{moe_runner_backend}-{gpu_arch}"


def default_format(profile: str) -> OutputFormat:
    from mm_convert.transform.profiles import get_profile

    return "presharded" if get_profile(profile).is_sglang_state else "experts"


def part_metadata(profile_name: str, parallel: ParallelShape, g) -> dict[str, str]:
    """The safetensors metadata of rank `g`'s expert part files (the writer writes it, validate
    checks it): which shape and rank the file belongs to and which experts it holds."""
    return {
        "mm_convert_profile": profile_name,
        "tp": str(parallel.tp),
        "ep": str(parallel.ep),
        "rank": str(g.rank),
        "moe_tp_rank": str(g.moe_tp_rank),
        "moe_ep_rank": str(g.moe_ep_rank),
        "local_expert_offset": str(g.first_expert),
        "local_num_experts": str(g.num_local_experts),
    }


def expert_tensor_name(layer: int, kind: ExpertTensorKind) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{kind}"


def parse_expert_tensor_name(name: str) -> tuple[int, ExpertTensorKind] | None:
    prefix, sep, kind = name.rpartition(".block_sparse_moe.experts.")
    if not sep or kind not in EXPERT_TENSOR_KINDS or not prefix.startswith("model.layers."):
        return None
    layer = prefix[len("model.layers.") :]
    canonical = layer.isdigit() and (layer == "0" or not layer.startswith("0"))
    return (int(layer), kind) if canonical else None  # type: ignore[return-value]


@dataclass(frozen=True)
class ShapeEntry:
    """One parallel shape present under `experts/`."""

    tp: int
    ep: int
    moe_tp: int
    padded_intermediate_size: int
    experts_per_rank: int
    parts_per_rank: int  # experts format: part files per rank
    dir: str  # relative to the output folder; identifies the shape
    format: str = "experts"
    gpu_arch: str | None = None  # presharded: the GPU whose post-processed state was written
    sglang_version: str | None = None  # presharded: the SGLang release whose state it is
    ranks: tuple[int, ...] | None = None  # presharded: the ranks whose files are here (None: all)
    data_files: int = 0  # presharded: tensor files in the folder

    def __post_init__(self) -> None:
        if self.ranks is not None:
            object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))

    @classmethod
    def of(cls, parallel: ParallelShape, model: ModelShape, **rest: Any) -> "ShapeEntry":
        """The entry of a launch shape: its sizes from the model, the rest (folder, format...) as given."""
        return cls(tp=parallel.tp, ep=parallel.ep, moe_tp=parallel.moe_tp,
                   padded_intermediate_size=parallel.padded_intermediate_size(model),
                   experts_per_rank=parallel.experts_per_rank(model), **rest)

    @property
    def parallel(self) -> ParallelShape:
        return ParallelShape(self.tp, self.ep)

    @property
    def key(self) -> str:
        """How reports and the manifest's validation record name this shape."""
        return self.dir if self.format == "presharded" else self.parallel.dirname

    @property
    def present_ranks(self) -> tuple[int, ...]:
        return self.ranks if self.ranks is not None else tuple(range(self.tp))

    @property
    def label(self) -> str:
        label = self.parallel.label
        if self.format == "presharded":
            label += f" ({self.gpu_arch}" + ("" if self.ranks is None else f", ranks {','.join(map(str, self.ranks))}") + ")"
        return label


@dataclass(frozen=True)
class ConfigBlock:
    """The `mm_convert` block added to `config.json`.

    `tp`, `ep`, `moe_tp` and `padded_intermediate_size` at the top describe the first shape in
    `shapes` (the contract's single-shape fields); `shapes` lists every shape in the folder.
    """

    format_version: int
    profile: str
    use_shuffled_weight: bool
    weight_layout: int
    source_kind: str
    shapes: tuple[ShapeEntry, ...]
    kernel: str = KERNEL_NAME
    moe_runner_backend: str = MOE_RUNNER_BACKEND
    tool_version: str = ""
    format: str = "experts"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        first = self.shapes[0]
        return {
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "format": self.format,
            "profile": self.profile,
            "tp": first.tp,
            "ep": first.ep,
            "moe_tp": first.moe_tp,
            "padded_intermediate_size": first.padded_intermediate_size,
            "use_shuffled_weight": self.use_shuffled_weight,
            "weight_layout": self.weight_layout,
            "kernel": self.kernel,
            "moe_runner_backend": self.moe_runner_backend,
            "source_kind": self.source_kind,
            "shapes": [asdict(s) for s in self.shapes],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = CONFIG_NAME) -> "ConfigBlock":
        if not isinstance(d, dict):
            raise CheckFailed(f"{where}: no {CONFIG_BLOCK_KEY!r} block: not a converted checkpoint")
        try:
            shapes = tuple(ShapeEntry(**s) for s in d["shapes"])
            block = cls(
                format_version=int(d["format_version"]),
                profile=str(d["profile"]),
                use_shuffled_weight=bool(d["use_shuffled_weight"]),
                weight_layout=int(d["weight_layout"]),
                source_kind=str(d["source_kind"]),
                shapes=shapes,
                kernel=str(d.get("kernel", KERNEL_NAME)),
                moe_runner_backend=str(d.get("moe_runner_backend", MOE_RUNNER_BACKEND)),
                tool_version=str(d.get("tool_version", "")),
                format=str(d.get("format", "experts")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckFailed(f"{where}: malformed {CONFIG_BLOCK_KEY!r} block ({type(exc).__name__}: {exc})") from exc
        if not shapes:
            raise CheckFailed(f"{where}: {CONFIG_BLOCK_KEY!r} block lists no shapes")
        if block.format not in OUTPUT_FORMATS:
            raise CheckFailed(f"{where}: unknown output format {block.format!r} in the {CONFIG_BLOCK_KEY!r} block")
        if block.format_version > FORMAT_VERSION:
            raise CheckFailed(
                f"{where}: format version {block.format_version} is newer than this tool understands ({FORMAT_VERSION})"
            )
        return block

    def shape(self, parallel: ParallelShape) -> ShapeEntry | None:
        for s in self.shapes:
            if (s.tp, s.ep) == (parallel.tp, parallel.ep):
                return s
        return None

    def shape_at(self, directory: str) -> ShapeEntry | None:
        for s in self.shapes:
            if s.dir == directory:
                return s
        return None
