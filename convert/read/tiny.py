"""Synthetic MiniMax-M2-shaped checkpoints: the built-in tiny model and real-size benchmark layers.

The tiny model is small (a few MB) but shaped to hit the layout's edge cases:
intermediate_size 384 gives TP2 ranks of 192 rows padded to 256, TP4 leaves rank 3 all zeros and
TP8/TP16 leave most ranks zero; 12 experts divide by EP 1, 2, 3, 4, 6, 12 but not by 5, 8 or 16.
SGLang can build and load it (tests/parity): head_dim 128 with block-FP8 attention.
Weights are sharded so that some scales sit in a different shard than their weights.
An FP8 checkpoint is the BF16 one with the same seed, block-quantised.
"""

from __future__ import annotations
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
import torch
from mm_convert import model
from mm_convert.output_format import SYNTHETIC_KEY
from mm_convert.errors import RequestError
from mm_convert.transform.quant import quantize_fp8_block
from mm_convert.read.safetensors_file import TensorEntry, encode_header, tensor_bytes
from mm_convert.read.source import INDEX_NAME


@dataclass(frozen=True)
class SyntheticSpec:
    hidden_size: int = 256
    intermediate_size: int = 384
    num_layers: int = 3
    num_experts: int = 12
    top_k: int = 4
    # head_dim 128, as MiniMax-M2.5: SGLang's block-FP8 attention needs each rank's q/k/v rows in
    # whole 128-row blocks. 8 query heads shard up to TP8; 2 KV heads are replicated beyond TP2.
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    vocab_size: int = 512
    num_shards: int = 4
    # Real-size benchmark layers only: random FP8 bytes instead of quantising random BF16 (much faster).
    random_fp8_bytes: bool = False


TINY = SyntheticSpec()
# MiniMax-M2.5's real per-layer shapes (SPEC section 1) with a small vocabulary, for benchmarks.
REAL_LAYER = SyntheticSpec(
    hidden_size=3072, intermediate_size=1536, num_layers=2, num_experts=256, top_k=8,
    num_attention_heads=48, num_key_value_heads=8, head_dim=128, vocab_size=4096, num_shards=0,
)

WEIGHT_STD = 0.02


def config_for(spec: SyntheticSpec, dtype: str, seed: int = 0) -> dict:
    config = {
        "architectures": [model.ARCHITECTURE],
        "attn_type_list": [1] * spec.num_layers,
        "auto_map": {
            "AutoConfig": "configuration_minimax_m2.MiniMaxM2Config",
            "AutoModelForCausalLM": "modeling_minimax_m2.MiniMaxM2ForCausalLM",
        },
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": 4096,
        "model_type": model.MODEL_TYPE,
        "num_attention_heads": spec.num_attention_heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "num_local_experts": spec.num_experts,
        "qk_norm_type": "per_layer",
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "rotary_dim": spec.head_dim // 2,
        "scoring_func": "sigmoid",
        "shared_intermediate_size": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_qk_norm": True,
        "use_routing_bias": True,
        "vocab_size": spec.vocab_size,
        SYNTHETIC_KEY: {"made_by": "mm-convert make-tiny", "dtype": dtype, "seed": seed,
                        "note": "random weights, not a trained model"},
    }
    if dtype == "fp8":
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": model.FP8_DTYPE_NAME,
            "quant_method": "fp8",
            "weight_block_size": [model.QUANT_BLOCK, model.QUANT_BLOCK],
            "modules_to_not_convert": list(model.MODULES_NOT_CONVERTED),
        }
    return config


def _shape_of(spec: SyntheticSpec) -> model.ModelShape:
    return model.read_model_shape(config_for(spec, "bf16"))


def tensor_specs(spec: SyntheticSpec, dtype: str) -> list[TensorEntry]:
    """Every tensor of the checkpoint (name, dtype, shape), in layer order, before any is drawn."""
    shape = _shape_of(spec)

    def linear(name: str, s: tuple[int, ...]) -> list[TensorEntry]:
        if dtype == "fp8":
            return [TensorEntry(name, "F8_E4M3", s), TensorEntry(name + "_scale_inv", "F32", model.scale_shape(s))]
        return [TensorEntry(name, "BF16", s)]

    specs: list[TensorEntry] = []
    for name, (s, is_linear) in model.non_expert_tensor_shapes(shape).items():
        if is_linear:
            specs += linear(name, s)
        else:
            router = name.endswith("gate.weight") or name.endswith("e_score_correction_bias")
            specs.append(TensorEntry(name, "F32" if router else "BF16", s))  # the router is fp32, as the model ships
    for layer in range(shape.num_layers):
        for expert in range(shape.num_experts):
            for proj, s in shape.expert_weight_shapes.items():
                specs += linear(model.expert_weight_name(layer, expert, proj), s)
    return specs


class TensorSource:
    """Draws each tensor from a generator seeded by (seed, tensor name), so any order gives the
    same bytes. An FP8 weight is the block quantisation of the BF16 tensor the same seed gives,
    so an FP8 checkpoint is exactly the quantised BF16 one. `device="cuda"` draws linear weights
    on the GPU (real-size benchmark layers; bytes then follow the device's generator)."""

    def __init__(self, spec: SyntheticSpec, dtype: str, seed: int, device: str = "cpu"):
        self.spec, self.dtype, self.seed, self.device = spec, dtype, seed, device
        self._pending: dict[str, torch.Tensor] = {}  # scales drawn with their weight, not yet asked for

    def _gen(self, name: str, device: str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    def _bf16(self, name: str, shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
        return (torch.randn(shape, generator=self._gen(name, device), device=device) * WEIGHT_STD).to(torch.bfloat16)

    def tensor(self, t: TensorEntry) -> torch.Tensor:
        if t.name.endswith("_scale_inv"):
            base = t.name[: -len("_scale_inv")]
            if base not in self._pending:
                self._quantised(base, t)
            return self._pending.pop(base)
        if t.dtype == "F8_E4M3":
            return self._quantised(t.name, t)
        if t.name.endswith("gate.weight") and t.dtype == "F32":
            return torch.randn(t.shape, generator=self._gen(t.name)) * 0.5
        if t.name.endswith("e_score_correction_bias"):
            return torch.randn(t.shape, generator=self._gen(t.name)) * 0.05
        if t.name.endswith("norm.weight") or t.name.endswith("layernorm.weight"):
            return (1.0 + torch.randn(t.shape, generator=self._gen(t.name)) * 0.05).to(torch.bfloat16)
        return self._bf16(t.name, t.shape)

    def _quantised(self, weight_name: str, t: TensorEntry) -> torch.Tensor:
        shape = t.shape if not t.name.endswith("_scale_inv") else None
        weight_shape = shape or self._weight_shape(weight_name)
        if self.spec.random_fp8_bytes:
            gen = self._gen(weight_name)
            q = torch.randint(0, 256, weight_shape, dtype=torch.uint8, generator=gen)
            q[(q & 0x7F) == 0x7F] -= 1  # no NaN encodings
            scale = torch.rand(model.scale_shape(weight_shape), generator=gen) * 1e-4 + 1e-5
            q = q.view(torch.float8_e4m3fn)
        else:
            q, scale = quantize_fp8_block(self._bf16(weight_name, weight_shape, self.device))
            q, scale = q.cpu(), scale.cpu()
        self._pending[weight_name] = scale
        return q

    def _weight_shape(self, weight_name: str) -> tuple[int, ...]:
        for t in tensor_specs(self.spec, self.dtype):
            if t.name == weight_name:
                return t.shape
        raise KeyError(weight_name)


AUX_FILES = {
    "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2, "temperature": 1.0}, indent=2) + "\n",
    "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 4096}, indent=2) + "\n",
    "chat_template.jinja": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}",
    "modeling_minimax_m2.py": "# Remote code placeholder of the synthetic tiny model: copied as data, never run.\nraise SystemExit(1)\n",
    "configuration_minimax_m2.py": "# Remote code placeholder of the synthetic tiny model: copied as data, never run.\nraise SystemExit(1)\n",
    "LICENSE": "Synthetic test weights generated by mm-convert make-tiny; no licence restrictions.\n",
    # a card like upstream's: licence fields and a pipeline tag for the converted card to carry over
    "README.md": ("---\nlicense: other\nlicense_name: synthetic-test-weights\nlicense_link: LICENSE\n"
                  "pipeline_tag: text-generation\ntags:\n- synthetic\n---\n\n# Synthetic tiny MiniMax-M2\n\n"
                  "Random weights made by `mm-convert make-tiny` for tests: not a trained model.\n"),
}


def make_synthetic(out: str | Path, spec: SyntheticSpec = TINY, dtype: str = "fp8", seed: int = 0,
                   device: str = "cpu") -> Path:
    """Write a synthetic MiniMax-M2 checkpoint folder (config, sharded safetensors, index, aux files)."""
    if dtype not in ("fp8", "bf16"):
        raise RequestError(f"--dtype must be fp8 or bf16, got {dtype!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RequestError(f"{out}: exists and is not a folder; make-tiny writes into an empty or new folder")
    if out.exists() and any(out.iterdir()):
        raise RequestError(f"{out}: not empty; make-tiny writes into an empty or new folder")
    # Built in a sibling folder and renamed at the end: a crash never leaves a half-made source.
    building = out.with_name(out.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)

    specs = tensor_specs(spec, dtype)
    source = TensorSource(spec, dtype, seed, device)
    shards = _assign_shards(specs, spec.num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(building / file_name, shard, source)
        for t in shard:
            weight_map[t.name] = file_name
            total += t.nbytes
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (building / INDEX_NAME).write_text(json.dumps(index_json, indent=2) + "\n")
    (building / "config.json").write_text(json.dumps(config_for(spec, dtype, seed), indent=2) + "\n")
    for name, text in AUX_FILES.items():
        (building / name).write_text(text)
    for f in building.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        out.rmdir()
    os.replace(building, out)
    return out


def _write_shard(path: Path, shard: list[TensorEntry], source: TensorSource) -> None:
    """Header first (offsets are known from shapes), then each tensor as it is drawn: no shard in memory."""
    entries, offset = [], 0
    for t in shard:
        entries.append(TensorEntry(t.name, t.dtype, t.shape, offset))
        offset += t.nbytes
    with open(path, "wb") as f:
        f.write(encode_header(entries, {"format": "pt"}))
        for t in shard:
            data = source.tensor(t).contiguous()
            f.write(tensor_bytes(data))


def _assign_shards(specs: list[TensorEntry], num_shards: int) -> list[list[TensorEntry]]:
    if num_shards <= 1:
        return [specs]
    # Scales of expert 0 go to the last shard, away from their weights (real checkpoints do this too).
    moved = [t for t in specs if t.name.endswith((".experts.0.w1.weight_scale_inv", ".experts.0.w2.weight_scale_inv"))]
    moved_names = {t.name for t in moved}
    rest = [t for t in specs if t.name not in moved_names]
    target = sum(t.nbytes for t in rest) / (num_shards - 1)
    shards: list[list[TensorEntry]] = [[]]
    acc = 0
    for t in rest:
        if acc >= target * len(shards) and len(shards) < num_shards - 1:
            shards.append([])
        shards[-1].append(t)
        acc += t.nbytes
    return shards + [moved] if moved else shards
