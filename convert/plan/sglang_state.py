"""What one SGLang 0.5.23 rank holds after loading a MiniMax-M2 checkpoint (SPEC section 10).

For a launch with `--moe-runner-backend flashinfer_trtllm_routed --quantization fp8`, every
parameter of SGLang's `MiniMaxM2ForCausalLM` after `process_weights_after_loading`, in SGLang's
`state_dict()` order (except that a layer's four expert tensors come in the order the conversion
produces them, `EXPERT_TENSOR_KINDS`), with its dtype, its shape and a *recipe*: plain data
saying how its bytes come from the source tensors. Nothing here reads a byte; `convert/rank_tensors.py` executes
recipes. Each rule names the SGLang source it was read from (docs/research/sglang-0.5.23.md) and
is proven by the SGLang tier (tests/parity), which compares every rank against SGLang's own loader.

- Attention is tensor-parallel over all `tp` ranks (no DP attention): `qkv_proj` is the rank's q
  rows, then its k rows, then its v rows (`QKVParallelLinear`; KV heads are replicated when
  `tp > num_key_value_heads`), `o_proj` the rank's columns (`RowParallelLinear`), with 128-row or
  128-column blocks of block scales; `q_norm`/`k_norm` the rank's heads (`MiniMaxM2RMSNormTP`).
- The embedding and lm_head are padded to a multiple of 64 rows (64 x tp when that does not
  divide) and split in equal row blocks, zero past the vocabulary (`VocabParallelEmbedding`).
- Experts are the `sglang` profile (convert/profiles.py); norms, the router gate and the
  correction bias are replicated; `attn.k_scale`/`v_scale` are fp32 1.0 (no scales in the checkpoint).
- The GPU matters: on SM100 (Blackwell) with default settings the FP8 linear layers run on
  DeepGEMM, and post-processing re-quantises their weights with power-of-two block scales and packs
  the scales as UE8M0 int32 (`fp8.py` L835-848, `fp8_utils.py` L2147-2417; convert/quant.py has
  the math). On SM90 (Hopper, or SGLang on a CPU) they stay as loaded. Everything else is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol

from mm_convert import model
from mm_convert.errors import RequestError
from mm_convert.model import QUANT_BLOCK, ModelShape
from mm_convert.output_format import EXPERT_DTYPES, EXPERT_TENSOR_KINDS, ExpertTensorKind, expert_tensor_name
from mm_convert.plan.parallel import ParallelShape, RankGeometry
from mm_convert.transform.profiles import sglang_state_profile
from mm_convert.transform.quant import packed_ue8m0_scale_shape
from mm_convert.read.safetensors_file import DTYPES

SGLANG_VERSION = "0.5.23"
MOE_RUNNER_BACKEND = "flashinfer_trtllm_routed"
QUANTIZATION = "fp8"
GpuArch = Literal["sm100", "sm90"]
GPU_ARCHS: tuple[GpuArch, ...] = ("sm100", "sm90")
# The routed TRT-LLM kernel runs only on Blackwell, so that is what a presharded folder is for by default.
DEFAULT_GPU_ARCH: GpuArch = "sm100"
GPU_ARCH_NAMES = {"sm100": "Blackwell (SM100/SM103)", "sm90": "Hopper (SM90), or SGLang on a CPU"}
VOCAB_PADDING = 64  # vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE
# `--dtype auto` takes the config's torch_dtype; these are the ones whose rules were checked.
MODEL_DTYPES = {"bfloat16": "BF16", "float16": "F16"}

# -- recipes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """`count` indices of a source tensor from `start`, along the assembly's axis."""

    source: str
    start: int
    count: int


@dataclass(frozen=True)
class Zeros:
    """`count` indices of zeros along the assembly's axis (padding past the end of the source)."""

    count: int


@dataclass(frozen=True)
class Assemble:
    """Parts laid end to end along `axis` (0: rows, 1: columns), cast to the tensor's dtype."""

    axis: int
    parts: tuple[Rows | Zeros, ...]


@dataclass(frozen=True)
class Constant:
    value: float


@dataclass(frozen=True)
class ExpertTensor:
    """One of the four expert tensors of a layer, packed by the `sglang` profile for the rank."""

    layer: int
    kind: ExpertTensorKind


@dataclass(frozen=True)
class Ue8m0Requant:
    """SM100's DeepGEMM post-processing of an FP8 linear layer (`quant.requant_ue8m0`): the
    re-quantised weight or its packed UE8M0 scales, from the loaded weight and fp32 scales."""

    weight: Assemble
    scale: Assemble
    weight_shape: tuple[int, int]
    part: Literal["weight", "scale"]


Recipe = Assemble | Constant | ExpertTensor | Ue8m0Requant


@dataclass(frozen=True)
class RankTensor:
    """One parameter of a rank as SGLang holds it after post-processing.

    `built_*` is the parameter as the model builds it, before post-processing (what SGLang's
    structural signature hashes), when it differs.
    """

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    recipe: Recipe
    built_dtype: str | None = None
    built_shape: tuple[int, ...] | None = None

    @property
    def torch_dtype_name(self) -> str:
        return str(DTYPES[self.dtype][0])

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n

    def signature_entry(self) -> tuple[str, tuple[int, ...], str]:
        """(name, shape, dtype) of the parameter as built, as SGLang's structural signature lists it."""
        dtype = self.built_dtype or self.dtype
        return (self.name, tuple(self.built_shape or self.shape), str(DTYPES[dtype][0]))


@dataclass(frozen=True)
class PreshardedTarget:
    """The SGLang launch a presharded folder is written for."""

    parallel: ParallelShape
    gpu_arch: GpuArch = DEFAULT_GPU_ARCH

    def check(self) -> None:
        if self.gpu_arch not in GPU_ARCHS:
            raise RequestError(f"--gpu-arch {self.gpu_arch!r}: choose one of {', '.join(GPU_ARCHS)}")


class SourceView(Protocol):
    """What the rules read of a source: its config, its shape and each tensor's dtype (headers only)."""

    config: Mapping[str, Any]
    shape: ModelShape

    def dtype_of(self, name: str) -> str: ...


# -- the model's parallel geometry (SGLang's rules) -------------------------------------------------


@dataclass(frozen=True)
class HeadSplit:
    """Which heads of a `total` a rank holds: `per_rank` heads from head `shard * per_rank`."""

    total: int
    per_rank: int
    shard: int

    @classmethod
    def of(cls, total: int, tp: int, rank: int, what: str) -> "HeadSplit":
        # QKVParallelLinear and MiniMaxM2RMSNormTP: split when there are at least tp heads, else replicate.
        if total >= tp:
            if total % tp:
                raise RequestError(f"{what}={total} is not divisible by tp={tp}: SGLang cannot shard it")
            return cls(total, total // tp, rank)
        if tp % total:
            raise RequestError(f"tp={tp} is not a multiple of {what}={total}: SGLang cannot replicate them")
        return cls(total, 1, rank // (tp // total))


def vocab_rows(vocab: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(first source row, real rows, rows per rank) of a rank's embedding / lm_head shard."""
    pad = VOCAB_PADDING
    if -(-vocab // pad) * pad % tp:
        pad *= tp
    padded = -(-vocab // pad) * pad
    per_rank = padded // tp
    start = min(rank * per_rank, vocab)
    return start, min((rank + 1) * per_rank, vocab) - start, per_rank


def model_dtype(config: Mapping[str, Any]) -> str:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    if name not in MODEL_DTYPES:
        raise RequestError(
            f"config.json: torch_dtype {name!r}: presharded output is written for {', '.join(MODEL_DTYPES)} models only"
        )
    return MODEL_DTYPES[name]


# -- one rank ------------------------------------------------------------------------------------


def _whole(name: str, rows: int) -> Assemble:
    return Assemble(0, (Rows(name, 0, rows),))


def _blocks(n: int, what: str) -> int:
    if n % QUANT_BLOCK:
        raise RequestError(f"{what}: {n} rows per rank is not a multiple of {QUANT_BLOCK}: its block scales cannot be split")
    return n // QUANT_BLOCK


def _fp8_linear(name: str, weight: Assemble, scale: Assemble, shape: tuple[int, int], gpu_arch: GpuArch) -> list[RankTensor]:
    scale_shape = (shape[0] // QUANT_BLOCK, shape[1] // QUANT_BLOCK)
    if gpu_arch == "sm90":
        return [RankTensor(f"{name}.weight", "F8_E4M3", shape, weight),
                RankTensor(f"{name}.weight_scale_inv", "F32", scale_shape, scale)]
    return [
        RankTensor(f"{name}.weight", "F8_E4M3", shape, Ue8m0Requant(weight, scale, shape, "weight")),
        RankTensor(f"{name}.weight_scale_inv", "I32", packed_ue8m0_scale_shape(shape), Ue8m0Requant(weight, scale, shape, "scale"),
                   built_dtype="F32", built_shape=scale_shape),
    ]


def _attention(source: SourceView, layer: int, tp: int, rank: int, dtype: str, gpu_arch: GpuArch) -> list[RankTensor]:
    m = source.shape
    hd = m.head_dim
    if m.num_attention_heads % tp:
        # MiniMaxM2Attention asserts total_num_heads % attn_tp_size == 0 (query heads are never replicated).
        raise RequestError(f"num_attention_heads={m.num_attention_heads} is not divisible by tp={tp}: SGLang cannot shard it")
    q = HeadSplit.of(m.num_attention_heads, tp, rank, "num_attention_heads")
    kv = HeadSplit.of(m.num_key_value_heads, tp, rank, "num_key_value_heads")
    qn, kn = q.per_rank * hd, kv.per_rank * hd
    qs, ks = q.shard * qn, kv.shard * kn
    prefix = f"model.layers.{layer}.self_attn"
    names = {p: f"{prefix}.{p}_proj.weight" for p in "qkvo"}
    fp8 = source.dtype_of(names["q"]) == "F8_E4M3"
    out: list[RankTensor] = []
    qkv = Assemble(0, (Rows(names["q"], qs, qn), Rows(names["k"], ks, kn), Rows(names["v"], ks, kn)))
    o = Assemble(1, (Rows(names["o"], qs, qn),))
    qkv_shape, o_shape = (qn + 2 * kn, m.hidden_size), (m.hidden_size, qn)
    if fp8:
        b = {p: names[p] + "_scale_inv" for p in "qkvo"}
        qb, kb = _blocks(qn, f"{names['q']}"), _blocks(kn, f"{names['k']}")
        qkv_scale = Assemble(0, (Rows(b["q"], qs // QUANT_BLOCK, qb), Rows(b["k"], ks // QUANT_BLOCK, kb),
                                 Rows(b["v"], ks // QUANT_BLOCK, kb)))
        o_scale = Assemble(1, (Rows(b["o"], qs // QUANT_BLOCK, qb),))
        out += _fp8_linear(f"{prefix}.qkv_proj", qkv, qkv_scale, qkv_shape, gpu_arch)
        out += _fp8_linear(f"{prefix}.o_proj", o, o_scale, o_shape, gpu_arch)
    else:
        out += [RankTensor(f"{prefix}.qkv_proj.weight", dtype, qkv_shape, qkv),
                RankTensor(f"{prefix}.o_proj.weight", dtype, o_shape, o)]
    if source.config.get("use_qk_norm", False):
        out += [
            RankTensor(f"{prefix}.q_norm.weight", dtype, (qn,), Assemble(0, (Rows(f"{prefix}.q_norm.weight", qs, qn),))),
            RankTensor(f"{prefix}.k_norm.weight", dtype, (kn,), Assemble(0, (Rows(f"{prefix}.k_norm.weight", ks, kn),))),
        ]
    # RadixAttention's kv-cache scales: created by the fp8 quant config, 1.0 when the checkpoint has none.
    out += [RankTensor(f"{prefix}.attn.k_scale", "F32", (), Constant(1.0)),
            RankTensor(f"{prefix}.attn.v_scale", "F32", (), Constant(1.0))]
    return out


def _experts(source: SourceView, layer: int, g: RankGeometry) -> dict[ExpertTensorKind, RankTensor]:
    shapes = sglang_state_profile().shapes(source.shape.hidden_size, g)
    by_kind = {"w13_weight": shapes.w13, "w13_weight_scale_inv": shapes.w13_scale,
               "w2_weight": shapes.w2, "w2_weight_scale_inv": shapes.w2_scale}
    return {kind: RankTensor(expert_tensor_name(layer, kind), EXPERT_DTYPES[kind], tuple(s), ExpertTensor(layer, kind))
            for kind, s in by_kind.items()}


def _vocab(name: str, vocab: int, hidden: int, tp: int, rank: int, dtype: str) -> RankTensor:
    start, real, per_rank = vocab_rows(vocab, tp, rank)
    parts: tuple[Rows | Zeros, ...] = tuple(p for p in (Rows(name, start, real), Zeros(per_rank - real)) if p.count)
    return RankTensor(name, dtype, (per_rank, hidden), Assemble(0, parts))


def rank_state(source: SourceView, target: PreshardedTarget, rank: int) -> tuple[RankTensor, ...]:
    """Every parameter `rank` holds, in SGLang's state_dict order (module registration order)."""
    m = source.shape
    tp = target.parallel.tp
    g = target.parallel.rank(m, rank)
    dtype = model_dtype(source.config)
    if m.num_experts < tp:
        # MiniMaxM2MoE.__init__ refuses it.
        raise RequestError(f"tp={tp} exceeds the {m.num_experts} experts: SGLang's MiniMaxM2MoE refuses that launch")
    if m.intermediate_size % target.parallel.moe_tp:
        # FusedMoE.__init__ asserts intermediate_size % moe_tp_size == 0.
        raise RequestError(f"intermediate_size={m.intermediate_size} is not divisible by moe_tp={target.parallel.moe_tp}: "
                           "SGLang refuses that launch")
    tensors = [_vocab("model.embed_tokens.weight", m.vocab_size, m.hidden_size, tp, rank, dtype)]
    for layer in range(m.num_layers):
        prefix = f"model.layers.{layer}"
        tensors += _attention(source, layer, tp, rank, dtype, target.gpu_arch)
        experts = _experts(source, layer, g)
        if source.config.get("use_routing_bias", False):
            bias = model.router_bias_name(layer)
            tensors.append(RankTensor(bias, "F32", (m.num_experts,), _whole(bias, m.num_experts)))
        tensors += [experts[kind] for kind in EXPERT_TENSOR_KINDS]
        gate = model.router_weight_name(layer)
        tensors.append(RankTensor(gate, "F32", (m.num_experts, m.hidden_size), _whole(gate, m.num_experts)))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"{prefix}.{norm}.weight"
            tensors.append(RankTensor(name, dtype, (m.hidden_size,), _whole(name, m.hidden_size)))
    tensors.append(RankTensor("model.norm.weight", dtype, (m.hidden_size,), _whole("model.norm.weight", m.hidden_size)))
    tensors.append(_vocab("lm_head.weight", m.vocab_size, m.hidden_size, tp, rank, dtype))
    return tuple(tensors)


def recipe_identity(t: RankTensor) -> tuple:
    """Non-expert tensors with equal recipes hold equal bytes (the same slice of the same source, cast
    the same way: a replicated norm, a KV head two ranks share, the constant kv scales)."""
    return ("recipe", t.recipe, t.dtype, t.shape)


def expert_identity(t: RankTensor, g: RankGeometry) -> tuple:
    """An expert tensor of a rank that holds no intermediate rows is all zeros of its shape (stored
    once for every layer and every such rank); any other expert tensor is its own."""
    return ("zeros", t.dtype, t.shape) if g.real_rows == 0 else ("expert", g.rank, t.name)


def not_loaded_by_sglang(name: str, config: Mapping[str, Any]) -> bool:
    """Source tensors SGLang's `MiniMaxM2ForCausalLM.load_weights` skips on purpose (minimax_m2.py
    L1137-1154): rotary inverse frequencies and the speculative (MTP) layers past num_hidden_layers."""
    if "rotary_emb.inv_freq" in name:
        return True
    mtp = config.get("num_mtp_modules") or 0
    layers = config.get("num_hidden_layers") or 0
    return isinstance(mtp, int) and any(name.startswith(f"model.layers.{layers + i}.") for i in range(mtp))


def sources_of(recipe: Recipe) -> tuple[str, ...]:
    """The source tensors a (non-expert) recipe reads."""
    if isinstance(recipe, Assemble):
        return tuple(p.source for p in recipe.parts if isinstance(p, Rows))
    if isinstance(recipe, Ue8m0Requant):
        return sources_of(recipe.weight) + sources_of(recipe.scale)
    return ()
