"""Synthetic MiniMax-M2-shaped checkpoints: the built-in tiny model and real-size benchmark layers.

The tiny model is small (a few MB) but shaped to hit the layout's edge cases:
intermediate_size 384 gives TP2 ranks of 192 rows padded to 256, TP4 leaves rank 3 all zeros and
TP8/TP16 leave most ranks zero; 12 experts divide by EP 1, 2, 3, 4, 6, 12 but not by 5, 8 or 16.
Weights are sharded so that some scales sit in a different shard than their weights.
An FP8 checkpoint is the BF16 one with the same seed, block-quantised.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from convert import model
from convert.errors import ConvertError
from convert.quant import quantize_fp8_block
from convert.source import INDEX_NAME


@dataclass(frozen=True)
class SyntheticSpec:
    hidden_size: int = 256
    intermediate_size: int = 384
    num_layers: int = 3
    num_experts: int = 12
    top_k: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
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


def config_for(spec: SyntheticSpec, dtype: str) -> dict:
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


def _random_fp8(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP8 bytes (NaN encodings avoided) with plausible positive scales."""
    q = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    q[(q & 0x7F) == 0x7F] -= 1
    scale = torch.rand(model.scale_shape(shape), generator=gen) * 1e-4 + 1e-5
    return q.view(torch.float8_e4m3fn), scale


def synthetic_tensors(spec: SyntheticSpec, dtype: str, seed: int, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, layer by layer, generated deterministically from `seed`.

    `device="cuda"` draws and quantises the linear weights on the GPU (for real-size benchmark
    layers); the bytes then depend on the device's random generator.
    """
    shape = _shape_of(spec)
    gen = torch.Generator().manual_seed(seed)
    dev_gen = gen if device == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def bf16(s: tuple[int, ...], std: float = WEIGHT_STD) -> torch.Tensor:
        return (torch.randn(s, generator=gen) * std).to(torch.bfloat16)

    def linear(name: str, s: tuple[int, ...]) -> Iterator[tuple[str, torch.Tensor]]:
        if dtype == "fp8" and spec.random_fp8_bytes:
            q, scale = _random_fp8(s, gen)
            yield name, q
            yield name + "_scale_inv", scale
        elif dtype == "fp8":
            w = (torch.randn(s, generator=dev_gen, device=device) * WEIGHT_STD).to(torch.bfloat16)
            q, scale = quantize_fp8_block(w)
            yield name, q.cpu()
            yield name + "_scale_inv", scale.cpu()
        else:
            yield name, bf16(s)

    for name, (s, is_linear) in model.non_expert_tensor_shapes(shape).items():
        if is_linear:
            yield from linear(name, s)
        elif name.endswith("gate.weight"):
            yield name, torch.randn(s, generator=gen) * 0.5  # router logits in fp32, as the model ships
        elif name.endswith("e_score_correction_bias"):
            yield name, torch.randn(s, generator=gen) * 0.05
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            yield name, (1.0 + torch.randn(s, generator=gen) * 0.05).to(torch.bfloat16)
        else:
            yield name, bf16(s)
    for layer in range(shape.num_layers):
        for expert in range(shape.num_experts):
            for proj, s in shape.expert_weight_shapes.items():
                yield from linear(model.expert_weight_name(layer, expert, proj), s)


AUX_FILES = {
    "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2, "temperature": 1.0}, indent=2) + "\n",
    "tokenizer_config.json": json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 4096}, indent=2) + "\n",
    "chat_template.jinja": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}",
    "modeling_minimax_m2.py": "# Remote code placeholder of the synthetic tiny model: copied as data, never run.\nraise SystemExit(1)\n",
    "configuration_minimax_m2.py": "# Remote code placeholder of the synthetic tiny model: copied as data, never run.\nraise SystemExit(1)\n",
    "LICENSE": "Synthetic test weights generated by mm-convert make-tiny; no licence restrictions.\n",
}


def make_synthetic(out: str | Path, spec: SyntheticSpec = TINY, dtype: str = "fp8", seed: int = 0,
                   device: str = "cpu") -> Path:
    """Write a synthetic MiniMax-M2 checkpoint folder (config, sharded safetensors, index, aux files)."""
    if dtype not in ("fp8", "bf16"):
        raise ConvertError(f"--dtype must be fp8 or bf16, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out}: not empty; make-tiny writes into an empty or new folder")
    # Built in a sibling folder and renamed at the end: a crash never leaves a half-made source.
    building = out.with_name(out.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)

    tensors = dict(synthetic_tensors(spec, dtype, seed, device))
    shards = _assign_shards(tensors, spec.num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index, names in enumerate(shards):
        file_name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(building / file_name), metadata={"format": "pt"})
        for n in names:
            weight_map[n] = file_name
            total += tensors[n].numel() * tensors[n].element_size()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (building / INDEX_NAME).write_text(json.dumps(index_json, indent=2) + "\n")
    (building / "config.json").write_text(json.dumps(config_for(spec, dtype), indent=2) + "\n")
    for name, text in AUX_FILES.items():
        (building / name).write_text(text)
    for f in building.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        out.rmdir()
    os.replace(building, out)
    return out


def _assign_shards(tensors: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    names = list(tensors)
    if num_shards <= 1:
        return [names]
    # Scales of expert 0 go to the last shard, away from their weights (real checkpoints do this too).
    moved = [n for n in names if n.endswith(".experts.0.w1.weight_scale_inv") or n.endswith(".experts.0.w2.weight_scale_inv")]
    rest = [n for n in names if n not in set(moved)]
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in rest]
    target = sum(sizes) / (num_shards - 1)
    shards: list[list[str]] = [[]]
    acc = 0
    for n, size in zip(rest, sizes):
        if acc >= target * len(shards) and len(shards) < num_shards - 1:
            shards.append([])
        shards[-1].append(n)
        acc += size
    return shards + [moved] if moved else shards
