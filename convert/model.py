"""MiniMax-M2 facts: config fields, tensor names, and which tensors are routed experts.

This module is the one place that knows how a MiniMax-M2 checkpoint is named and shaped
(SPEC section 1). Everything else asks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from mm_convert.errors import SourceError

ARCHITECTURE = "MiniMaxM2ForCausalLM"
MODEL_TYPE = "minimax_m2"
BASE_MODEL_REPO = "MiniMaxAI/MiniMax-M2.5"

# FP8 block quantisation as the model ships it.
QUANT_BLOCK = 128
FP8_DTYPE_NAME = "float8_e4m3fn"
FP8_MAX = 448.0
# A block scale above this makes 448 x scale overflow float32: the kernel's dequantised values would be inf.
FP8_MAX_SCALE = 3.4028234663852886e38 / FP8_MAX
MODULES_NOT_CONVERTED = ("gate", "e_score_correction_bias", "lm_head")

Projection = Literal["w1", "w2", "w3"]
PROJECTIONS: tuple[Projection, ...] = ("w1", "w2", "w3")

# Canonical numbers only (no leading zeros): `layers.01` is not layer 1, it is some other tensor.
_INDEX = r"(0|[1-9]\d*)"
_EXPERT_RE = re.compile(
    rf"^model\.layers\.{_INDEX}\.block_sparse_moe\.experts\.{_INDEX}\.(w[123])\.(weight|weight_scale_inv)$"
)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a MiniMax-M2 config that the conversion depends on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_experts: int
    top_k: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @property
    def expert_weight_shapes(self) -> dict[Projection, tuple[int, int]]:
        """Source shape `[out, in]` of each expert projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {"w1": (i, h), "w3": (i, h), "w2": (h, i)}


def scale_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """Shape of the 128x128 block-scale tensor that goes with a 2-D weight."""
    rows, cols = weight_shape
    return (-(-rows // QUANT_BLOCK), -(-cols // QUANT_BLOCK))


def read_model_shape(config: Mapping[str, Any], config_path: str = "config.json") -> ModelShape:
    """Extract the MoE-relevant numbers from a MiniMax-M2 `config.json` dict.

    Raises SourceError naming the field when one is missing or not a positive integer.
    """
    archs = config.get("architectures") or []
    if config.get("model_type") != MODEL_TYPE and ARCHITECTURE not in archs:
        raise SourceError(
            f"{config_path}: not a MiniMax-M2 config (model_type={config.get('model_type')!r}, "
            f"architectures={archs!r})"
        )

    def field(name: str) -> int:
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SourceError(f"{config_path}: field {name!r} must be a positive integer, got {value!r}")
        return value

    hidden = field("hidden_size")
    heads = field("num_attention_heads")
    head_dim = config.get("head_dim", hidden // heads)
    shape = ModelShape(
        hidden_size=hidden,
        intermediate_size=field("intermediate_size"),
        num_layers=field("num_hidden_layers"),
        num_experts=field("num_local_experts"),
        top_k=field("num_experts_per_tok"),
        num_attention_heads=heads,
        num_key_value_heads=field("num_key_value_heads"),
        head_dim=head_dim,
        vocab_size=field("vocab_size"),
    )
    if shape.top_k > shape.num_experts:
        raise SourceError(
            f"{config_path}: num_experts_per_tok={shape.top_k} exceeds num_local_experts={shape.num_experts}"
        )
    if shape.hidden_size % QUANT_BLOCK:
        # The kernels tile the hidden dimension in 128-wide blocks of activations scales.
        raise SourceError(f"{config_path}: hidden_size={shape.hidden_size} is not a multiple of {QUANT_BLOCK}")
    return shape


@dataclass(frozen=True)
class ExpertTensorName:
    """A parsed routed-expert tensor name."""

    layer: int
    expert: int
    projection: Projection
    is_scale: bool


def parse_expert_name(name: str) -> ExpertTensorName | None:
    """Return the parts of a routed-expert weight or scale name, or None for any other tensor."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    return ExpertTensorName(int(m[1]), int(m[2]), m[3], m[4] == "weight_scale_inv")  # type: ignore[arg-type]


def expert_weight_name(layer: int, expert: int, projection: Projection) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}.weight"


def expert_scale_name(layer: int, expert: int, projection: Projection) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{projection}.weight_scale_inv"


def router_weight_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def router_bias_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.e_score_correction_bias"


def attention_projection_names(layer: int) -> tuple[str, ...]:
    return tuple(f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o"))


def non_expert_tensor_shapes(shape: ModelShape) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every non-expert tensor of a MiniMax-M2 checkpoint: name -> (shape, is an FP8 linear weight).

    Used to build synthetic checkpoints; a real checkpoint may carry more (they pass through).
    """
    h, hd = shape.hidden_size, shape.head_dim
    q_out, kv_out = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    tensors: dict[str, tuple[tuple[int, ...], bool]] = {
        "model.embed_tokens.weight": ((shape.vocab_size, h), False),
        "model.norm.weight": ((h,), False),
        "lm_head.weight": ((shape.vocab_size, h), False),
    }
    for layer in range(shape.num_layers):
        q, k, v, o = attention_projection_names(layer)
        prefix = f"model.layers.{layer}"
        tensors.update(
            {
                q: ((q_out, h), True),
                k: ((kv_out, h), True),
                v: ((kv_out, h), True),
                o: ((h, q_out), True),
                f"{prefix}.self_attn.q_norm.weight": ((q_out,), False),
                f"{prefix}.self_attn.k_norm.weight": ((kv_out,), False),
                f"{prefix}.input_layernorm.weight": ((h,), False),
                f"{prefix}.post_attention_layernorm.weight": ((h,), False),
                router_weight_name(layer): ((shape.num_experts, h), False),
                router_bias_name(layer): ((shape.num_experts,), False),
            }
        )
    return tensors


# Files a MiniMax-M2 repository carries next to its weights, copied unchanged into the output.
# Remote-code `.py` files are copied as data, never imported.
AUXILIARY_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.py",
    "LICENSE*",
    "license*",
    "NOTICE*",
)
