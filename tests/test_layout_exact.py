"""Expert tensors byte for byte against an independent implementation of SPEC section 4,
for a grid of (tp, ep) including zero-filled ranks, both profiles, FP8 and BF16 sources."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch
from flashinfer import shuffle_matrix_a
from flashinfer.fused_moe import convert_to_block_layout
from flashinfer.trace.templates._init_helpers import fp8_block_quant_2d

from mm_convert.commands.convert import ConvertOptions, convert
from tests import reference_layout as ref
from tests.checkpoint_io import as_bytes, load_all, load_file, metadata

# (tp, ep): TP2 pads 192 -> 256 rows; TP4 leaves rank 3 all zero; TP8/TP16 leave most ranks zero;
# EP 2, 3, 4, 6 split the 12 experts; TP8 EP2 and TP16 EP4 mix both.
SHAPES = [(1, 1), (2, 1), (3, 1), (4, 1), (8, 1), (16, 1), (2, 2), (3, 3), (4, 2), (4, 4), (6, 6), (8, 2), (16, 4)]


@pytest.fixture(scope="module")
def sources(tiny_fp8, tiny_bf16):
    return {"fp8": tiny_fp8, "bf16": tiny_bf16}


@lru_cache(maxsize=4)
def _source_experts(folder: str, kind: str):
    """(layer, expert) -> (w1, w3, w2, s1, s3, s2) as FP8 bytes + fp32 scales, independently derived."""
    tensors = load_all(Path(folder))
    experts = {}
    for layer in range(3):
        for e in range(12):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            if kind == "fp8":
                ws = [as_bytes(tensors[p + f"{w}.weight"]) for w in ("w1", "w3", "w2")]
                ss = [tensors[p + f"{w}.weight_scale_inv"] for w in ("w1", "w3", "w2")]
            else:  # FlashInfer's own block quantiser is the reference for BF16 sources
                q = [fp8_block_quant_2d(tensors[p + f"{w}.weight"]) for w in ("w1", "w3", "w2")]
                ws = [as_bytes(x[0]) for x in q]
                ss = [x[1] for x in q]
            experts[(layer, e)] = (*ws, *ss)
    return experts


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
@pytest.mark.parametrize("profile", ["sglang", "trtllm"])
@pytest.mark.parametrize("tp,ep", SHAPES)
def test_expert_tensors_match_spec(sources, tmp_path, kind, profile, tp, ep):
    out = tmp_path / "out"
    convert(sources[kind], out, ConvertOptions(profile=profile, format="experts", tp=tp, ep=ep, quiet=True))
    experts = _source_experts(str(sources[kind]), kind)
    ranks = ref.ranks_of(tp, ep, num_experts=12, intermediate=384)
    zero_ranks = 0
    for rank, (t, first, e_loc, i_p) in enumerate(ranks):
        path = out / f"experts/tp{tp}-ep{ep}/rank-{rank}-part-0.safetensors"
        got = load_file(path)
        meta = metadata(path)
        assert (meta["rank"], meta["local_expert_offset"], meta["local_num_experts"]) == (str(rank), str(first), str(e_loc))
        assert len(got) == 3 * 4
        rank_is_zero = True
        for layer in range(3):
            name = f"model.layers.{layer}.block_sparse_moe.experts."
            want = [ref.sglang_expert(*experts[(layer, e)], moe_tp_rank=t, i_p=i_p) for e in range(first, first + e_loc)]
            w13 = torch.stack([w[0] for w in want])
            w2 = torch.stack([w[2] for w in want])
            if profile == "trtllm":
                w13 = torch.stack([ref.block_major_naive(ref.shuffle_rows_naive(m)) for m in w13])
                w2 = torch.stack([ref.block_major_naive(ref.shuffle_rows_naive(m)) for m in w2])
            assert got[name + "w13_weight"].dtype == torch.float8_e4m3fn
            assert torch.equal(as_bytes(got[name + "w13_weight"]), w13), (rank, layer)
            assert torch.equal(as_bytes(got[name + "w2_weight"]), w2), (rank, layer)
            # Scales compared bit for bit (a float compare would let -0.0 == 0.0 through).
            for key, idx in (("w13_weight_scale_inv", 1), ("w2_weight_scale_inv", 3)):
                want_s = torch.stack([w[idx] for w in want])
                assert got[name + key].dtype == torch.float32
                assert torch.equal(got[name + key].view(torch.int32), want_s.view(torch.int32)), (rank, layer, key)
            rank_is_zero &= not bool(w13.any())
        zero_ranks += rank_is_zero
    # The grid really covers the zero-filled edge case: TP4 has one all-zero rank, TP16 has 13.
    assert zero_ranks == sum(1 for t, _, _, i_p in ranks if t * i_p >= 384)


@pytest.mark.parametrize("m,k", [(256, 256), (768, 256), (512, 384), (3072, 1536)])
def test_trtllm_layout_matches_flashinfer_helpers(m, k):
    """mm_convert.transform.profiles' shuffle + BlockMajorK equal FlashInfer's shuffle_matrix_a + convert_to_block_layout."""
    from mm_convert.transform.profiles import from_block_major_shuffled, to_block_major_shuffled

    w = torch.randint(0, 256, (3, m, k), dtype=torch.uint8).view(torch.float8_e4m3fn)
    ours = to_block_major_shuffled(w)
    theirs = torch.stack([convert_to_block_layout(shuffle_matrix_a(w[i].view(torch.uint8), 64), 128) for i in range(3)])
    assert ours.shape == (3, k // 128, m, 128)
    assert torch.equal(ours.view(torch.uint8), theirs)
    assert torch.equal(from_block_major_shuffled(ours).view(torch.uint8), w.view(torch.uint8))


def test_naive_shuffle_agrees_with_flashinfer():
    """The tests' own reading of the TRT-LLM row map is the same permutation FlashInfer applies."""
    w = torch.arange(64 * 128, dtype=torch.int32).reshape(64, 128).to(torch.uint8)
    rows = torch.arange(64).repeat_interleave(2).reshape(64, 2).to(torch.uint8)
    assert torch.equal(ref.shuffle_rows_naive(rows), shuffle_matrix_a(rows, 64))
    assert torch.equal(ref.block_major_naive(w), convert_to_block_layout(w, 128))
