"""Each profile has an exact inverse: undoing it on every rank gives back the source bytes."""

from __future__ import annotations

import pytest
import torch

from mm_convert import model
from mm_convert.read.read_experts import load_down, load_gate_up
from mm_convert.plan.parallel import ParallelShape
from mm_convert.transform.profiles import PROFILES, Down, GateUp, Packed
from mm_convert.read.source import SourceCheckpoint


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (4, 1), (4, 2), (8, 1), (16, 4)])
def test_inverse_recovers_source(tiny_fp8, profile, tp, ep):
    prof = PROFILES[profile]
    with SourceCheckpoint.open(tiny_fp8) as src:
        shape = ParallelShape(tp, ep)
        ranks = shape.ranks(src.shape)
        layer = 1
        all_experts = range(src.shape.num_experts)
        gate_up = load_gate_up(src, layer, all_experts)
        down = load_down(src, layer, all_experts)
        gate_rows = {e: [] for e in all_experts}
        up_rows, down_cols = {e: [] for e in all_experts}, {e: [] for e in all_experts}
        gate_scale_rows, up_scale_rows, down_scale_cols = ({e: [] for e in all_experts} for _ in range(3))
        for g in ranks:
            local = slice(g.first_expert, g.first_expert + g.num_local_experts)
            packed1 = prof.pack_gate_up(GateUp(gate_up.gate[local], gate_up.up[local], gate_up.gate_scale[local], gate_up.up_scale[local]), g)
            packed2 = prof.pack_down(Down(down.weight[local], down.scale[local]), g)
            back1 = prof.unpack_gate_up(Packed(packed1.weight.clone(), packed1.scale.clone()), g)
            back2 = prof.unpack_down(Packed(packed2.weight.clone(), packed2.scale.clone()), g)
            # Everything outside the real rows is zero: padding carries no information.
            major_k = prof.to_major_k(packed1.weight).view(torch.uint8)
            ip = g.padded_intermediate_size
            assert not major_k[:, g.real_rows : ip].any() and not major_k[:, ip + g.real_rows :].any()
            for i, e in enumerate(g.experts):
                gate_rows[e].append(back1.gate[i])
                up_rows[e].append(back1.up[i])
                gate_scale_rows[e].append(back1.gate_scale[i])
                up_scale_rows[e].append(back1.up_scale[i])
                down_cols[e].append(back2.weight[i])
                down_scale_cols[e].append(back2.scale[i])
        for e in all_experts:
            names = {p: model.expert_weight_name(layer, e, p) for p in ("w1", "w2", "w3")}
            assert torch.equal(torch.cat(gate_rows[e]).view(torch.uint8), src.read(names["w1"]).view(torch.uint8))
            assert torch.equal(torch.cat(up_rows[e]).view(torch.uint8), src.read(names["w3"]).view(torch.uint8))
            assert torch.equal(torch.cat(down_cols[e], dim=1).view(torch.uint8), src.read(names["w2"]).view(torch.uint8))
            assert torch.equal(torch.cat(gate_scale_rows[e]), src.read(model.expert_scale_name(layer, e, "w1")))
            assert torch.equal(torch.cat(up_scale_rows[e]), src.read(model.expert_scale_name(layer, e, "w3")))
            assert torch.equal(torch.cat(down_scale_cols[e], dim=1), src.read(model.expert_scale_name(layer, e, "w2")))


def test_partial_last_block_keeps_its_scale():
    """intermediate 320 (not a multiple of 128): the last scale block covers 64 real rows + padding."""
    from mm_convert.model import ModelShape
    from mm_convert.transform.profiles import sglang_pack_gate_up, sglang_unpack_gate_up

    shape = ModelShape(hidden_size=256, intermediate_size=320, num_layers=1, num_experts=2, top_k=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=256, vocab_size=8)
    g = ParallelShape(2, 1).rank(shape, 1)  # 320 // 2 = 160 -> I_p 256; rank 1 holds rows 256..319
    assert (g.row_start, g.real_rows, g.real_scale_rows) == (256, 64, 1)
    w = torch.randint(0, 120, (2, 320, 256), dtype=torch.uint8)
    s = torch.rand(2, 3, 2) + 0.5
    p = sglang_pack_gate_up(GateUp(w, w + 1, s, s + 1), g)
    assert torch.equal(p.weight[:, :64], (w + 1)[:, 256:]) and not p.weight[:, 64:256].any()
    assert torch.equal(p.scale[:, 0], (s + 1)[:, 2]) and not p.scale[:, 1].any()
    back = sglang_unpack_gate_up(p, g)
    assert torch.equal(back.gate, w[:, 256:]) and torch.equal(back.up_scale, (s + 1)[:, 2:])


@pytest.mark.parametrize("intermediate,tp", [(320, 2), (328, 2), (384, 2), (384, 4), (1536, 8)])
def test_trtllm_direct_paths_equal_shuffling_the_sglang_layout(intermediate, tp):
    """trtllm packs straight from the source when the rank's regions align with shuffle blocks and K
    blocks, and falls back to shuffling the whole sglang matrix when they do not; both agree."""
    from mm_convert.model import ModelShape
    from mm_convert.transform.profiles import (sglang_pack_down, sglang_pack_gate_up, to_block_major_shuffled,
                                  trtllm_pack_down, trtllm_pack_gate_up)

    shape = ModelShape(hidden_size=256, intermediate_size=intermediate, num_layers=1, num_experts=3, top_k=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=256, vocab_size=8)
    n, blocks = 3, -(-intermediate // 128)
    gu = GateUp(torch.randint(0, 255, (n, intermediate, 256), dtype=torch.uint8),
                torch.randint(0, 255, (n, intermediate, 256), dtype=torch.uint8),
                torch.rand(n, blocks, 2) + 0.1, torch.rand(n, blocks, 2) + 0.1)
    dn = Down(torch.randint(0, 255, (n, 256, intermediate), dtype=torch.uint8), torch.rand(n, 2, blocks) + 0.1)
    for g in ParallelShape(tp, 1).ranks(shape):
        want1, want2 = sglang_pack_gate_up(gu, g), sglang_pack_down(dn, g)
        shapes = PROFILES["trtllm"].shapes(256, g)
        # A reused buffer full of junk must come out exactly like a fresh one.
        for out in (None, torch.full((n, *shapes.w13[1:]), 7, dtype=torch.uint8)):
            got1 = trtllm_pack_gate_up(gu, g, out=out)
            assert torch.equal(got1.weight.view(torch.uint8), to_block_major_shuffled(want1.weight)), (intermediate, g.rank)
            assert torch.equal(got1.scale, want1.scale)
        got2 = trtllm_pack_down(dn, g, out=torch.full((n, *shapes.w2[1:]), 7, dtype=torch.uint8))
        assert torch.equal(got2.weight.view(torch.uint8), to_block_major_shuffled(want2.weight)), (intermediate, g.rank)
        assert torch.equal(got2.scale, want2.scale)
