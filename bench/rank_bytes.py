"""Bytes one serving rank reads: the per-rank layout against loading the original checkpoint.

    python bench/rank_bytes.py

Computed from MiniMax-M2.5's real shapes (mm_convert.model, mm_convert.transform.profiles, mm_convert.plan.parallel), no data
needed. Loading the original FP8 checkpoint, SGLang's FusedMoE loader reads every expert tensor the
rank takes a slice of in full and narrows it afterwards (docs/research/sglang-0.5.23.md), so a TP rank
(ep 1) reads all 256 experts of every layer and an EP rank reads its block. With the per-rank layout
it reads its own part files only. Both read the same non-expert tensors.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_convert.model import ModelShape, scale_shape  # noqa: E402
from mm_convert.plan.parallel import ParallelShape  # noqa: E402
from mm_convert.transform.profiles import PROFILES  # noqa: E402

M25 = ModelShape(hidden_size=3072, intermediate_size=1536, num_layers=62, num_experts=256, top_k=8,
                 num_attention_heads=48, num_key_value_heads=8, head_dim=128, vocab_size=200064)


def expert_bytes(model: ModelShape, experts: int) -> int:
    per = 0
    for shape in model.expert_weight_shapes.values():
        per += math.prod(shape) + 4 * math.prod(scale_shape(shape))
    return per * experts * model.num_layers


def non_expert_bytes(model: ModelShape) -> int:
    h, hd = model.hidden_size, model.head_dim
    q, kv = model.num_attention_heads * hd, model.num_key_value_heads * hd
    attention = sum(math.prod(s) + 4 * math.prod(scale_shape(s)) for s in ((q, h), (kv, h), (kv, h), (h, q)))
    per_layer = attention + 2 * (q + kv) + 2 * 2 * h + 4 * (model.num_experts * h + model.num_experts)
    return per_layer * model.num_layers + 2 * 2 * model.vocab_size * h + 2 * h


def rank_part_bytes(model: ModelShape, parallel: ParallelShape, profile: str = "sglang") -> int:
    s = PROFILES[profile].shapes(model.hidden_size, parallel.rank(model, 0))
    return model.num_layers * (math.prod(s.w13) + math.prod(s.w2) + 4 * (math.prod(s.w13_scale) + math.prod(s.w2_scale)))


def main() -> None:
    other = non_expert_bytes(M25)
    print(f"MiniMax-M2.5: experts {expert_bytes(M25, M25.num_experts) / 1e9:.1f} GB, other tensors {other / 1e9:.2f} GB")
    print(f"{'launch':<10}{'original: GB read per rank':>28}{'per-rank layout':>17}{'ratio':>8}")
    for label, tp, ep in (("TP4", 4, 1), ("TEP4", 4, 4), ("TP8", 8, 1), ("TP8 EP8", 8, 8)):
        parallel = ParallelShape(tp, ep)
        original = other + expert_bytes(M25, parallel.experts_per_rank(M25))
        ours = other + rank_part_bytes(M25, parallel)
        print(f"{label:<10}{original / 1e9:>28.1f}{ours / 1e9:>17.1f}{ours / original:>8.2f}")


if __name__ == "__main__":
    main()
