"""The `sglang` profile byte for byte against SGLang 0.5.23's own MoE weight loader (CPU only).

For each (tp, ep) and each rank, SGLang's real `MiniMaxM2MoE` / `FusedMoE` / `Fp8MoEMethod` are
built for that rank with `--moe-runner-backend flashinfer_trtllm_routed`, an FP8 checkpoint (the
tiny model, and one layer at MiniMax-M2.5's real expert shape) is fed through
`MiniMaxM2ForCausalLM.load_weights`, and the four expert tensors of every layer (`w13_weight`,
`w13_weight_scale_inv`, `w2_weight`, `w2_weight_scale_inv`) are compared byte for byte with
mm-convert's `rank-{r}-part-*.safetensors`. docs/SGLANG_PARITY.md says how to install and run it,
what is faked and why, and the latest result.

Run (from the repo root, in the venv of tests/parity/requirements.txt):
    /tmp/sgl-venv/bin/python -m pytest tests/parity -m sglang
Result table: /tmp/sgl-venv/bin/python -m tests.parity.test_sglang_parity
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mm_convert.commands.convert import ConvertOptions, convert
from mm_convert.model import read_model_shape
from mm_convert.plan.parallel import ParallelShape
from mm_convert.read.tiny import REAL_LAYER, make_synthetic
from tests.checkpoint_io import load_all
from tests.parity import sglang_harness as harness

pytestmark = pytest.mark.sglang

_WHY_NOT = harness.import_sglang()
if _WHY_NOT:
    pytest.skip(f"needs sglang=={harness.SGLANG_VERSION}: {_WHY_NOT}", allow_module_level=True)

# Required by the brief: (1,1), (2,1), (4,1) [rank 3 all zero], (4,2), (2,2), (3,3). The rest are
# cheap and reach more edge cases: TP6/TP8/TP12 leave 3/5/9 ranks all zero; EP 4, 6, 12 split the
# 12 experts 3, 2 and 1 per rank; TP8 EP2 mixes padding with EP. (384 % moe_tp == 0 in all.)
SHAPES = [
    (1, 1), (2, 1), (3, 1), (4, 1), (6, 1), (8, 1), (12, 1),
    (2, 2), (4, 2), (8, 2), (3, 3), (6, 3), (4, 4), (6, 6), (12, 12),
]
RANKS = [(tp, ep, r) for tp, ep in SHAPES for r in range(tp)]
# MiniMax-M2.5's real expert shape (hidden 3072, intermediate 1536), 1 layer of 8 random-FP8 experts
# (~113 MB): TP8 pads 192 -> 256 rows and leaves ranks 6 and 7 all zero, as in production.
REAL_SHAPES = [(8, 1), (4, 2), (8, 2)]
REAL_RANKS = [(tp, ep, r) for tp, ep in REAL_SHAPES for r in range(tp)]
_OUT: dict[tuple[str, int, int], Path] = {}


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mm-convert-sglang")


def real_shape_source(folder: Path) -> Path:
    spec = dataclasses.replace(REAL_LAYER, num_layers=1, num_experts=8, top_k=2)
    return make_synthetic(folder / "real-shape-fp8", spec, "fp8", seed=1)


@pytest.fixture(scope="module")
def real_fp8(tmp_path_factory) -> Path:
    return real_shape_source(tmp_path_factory.mktemp("src"))


def _converted(src: Path, root: Path, tp: int, ep: int) -> Path:
    key = (str(src), tp, ep)
    if key not in _OUT:
        out = root / f"{src.name}-tp{tp}-ep{ep}"
        convert(src, out, ConvertOptions(profile="sglang", format="experts", tp=tp, ep=ep, quiet=True))
        _OUT[key] = out
    return _OUT[key]


def mm_convert_rank(out: Path, tp: int, ep: int, rank: int) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    parts = sorted((out / f"experts/tp{tp}-ep{ep}").glob(f"rank-{rank}-part-*.safetensors"))
    assert parts, f"mm-convert wrote no part file for rank {rank} of tp{tp}-ep{ep}"
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors


@lru_cache(maxsize=None)
def _sglang(src: str, tp: int, ep: int, rank: int) -> harness.RankLoad:
    return harness.load_rank(Path(src), tp, ep, rank)


def _check_rank(sglang: harness.RankLoad, src: Path, out_root: Path, tp: int, ep: int, rank: int) -> None:
    info = sglang.info
    # What was tested is what the claim is about.
    assert info["runner_backend"] == "MoeRunnerBackend.FLASHINFER_TRTLLM_ROUTED", info
    assert info["quant_method"] == "Fp8MoEMethod" and info["weight_block_size"] == [128, 128], info
    assert info["use_flashinfer_trtllm_moe"] and info["use_padded_loading"], info

    # SGLang's rank arithmetic and mm-convert's agree.
    shape = read_model_shape(json.loads((src / "config.json").read_text()))
    g = ParallelShape(tp, ep).rank(shape, rank)
    assert (info["moe_tp_rank"], info["moe_ep_rank"], info["num_local_experts"], info["intermediate_size_per_partition"]) == (
        g.moe_tp_rank, g.moe_ep_rank, g.num_local_experts, g.padded_intermediate_size
    ), info

    ours = mm_convert_rank(_converted(src, out_root, tp, ep), tp, ep, rank)
    ours = {k: v for k, v in ours.items() if ".block_sparse_moe.experts." in k}
    assert len(sglang.loaded) == 4 * shape.num_layers
    problems = harness.compare(sglang.loaded, ours)
    assert not problems, "SGLang's loader and mm-convert differ:\n" + "\n".join(problems)


@pytest.mark.parametrize("tp,ep,rank", RANKS, ids=[f"tp{tp}-ep{ep}-rank{r}" for tp, ep, r in RANKS])
def test_sglang_loader_matches_mm_convert(tiny_fp8, out_root, tp, ep, rank):
    _check_rank(_sglang(str(tiny_fp8), tp, ep, rank), tiny_fp8, out_root, tp, ep, rank)


@pytest.mark.parametrize("tp,ep,rank", REAL_RANKS, ids=[f"tp{tp}-ep{ep}-rank{r}" for tp, ep, r in REAL_RANKS])
def test_sglang_loader_matches_mm_convert_real_expert_shape(real_fp8, out_root, tp, ep, rank):
    _check_rank(harness.load_rank(real_fp8, tp, ep, rank), real_fp8, out_root, tp, ep, rank)


@pytest.mark.parametrize("tp,ep,rank", RANKS, ids=[f"tp{tp}-ep{ep}-rank{r}" for tp, ep, r in RANKS])
def test_process_weights_after_loading_changes_nothing(tiny_fp8, tp, ep, rank):
    """Block FP8 on the trtllm backends: no shuffle or requant after loading (what is served = what is loaded)."""
    sglang = _sglang(str(tiny_fp8), tp, ep, rank)
    assert sglang.process_error is None, f"process_weights_after_loading failed on CPU: {sglang.process_error}"
    problems = harness.compare(sglang.loaded, sglang.processed)
    assert not problems, "process_weights_after_loading changed the expert tensors:\n" + "\n".join(problems)


def test_the_comparison_sees_the_plausible_wrong_layouts(tiny_fp8):
    """Negative controls on TP2 rank 1 (rows 256-383 real, 128 padded) against SGLang's tensors:
    [gate; up] order, the unpadded 192-row stride, and padded scale blocks left at the buffer's 1.0."""
    sglang = _sglang(str(tiny_fp8), 2, 1, 1).loaded
    src = load_all(tiny_fp8)
    p = "model.layers.0.block_sparse_moe.experts."
    w13, s13 = sglang[p + "w13_weight"], sglang[p + "w13_weight_scale_inv"]

    def stack(proj: str, what: str) -> torch.Tensor:
        return torch.stack([src[f"{p}{e}.{proj}.{what}"] for e in range(12)])

    up, gate = stack("w3", "weight").view(torch.uint8), stack("w1", "weight").view(torch.uint8)
    good = torch.zeros_like(w13.view(torch.uint8))
    good[:, :128], good[:, 256:384] = up[:, 256:384], gate[:, 256:384]
    assert harness.describe_difference("w13_weight", w13, good.view(w13.dtype)) is None  # the control's own control

    gate_first = torch.cat([good[:, 256:], good[:, :256]], 1)
    stride_192 = torch.zeros_like(good)
    stride_192[:, :192], stride_192[:, 256:448] = up[:, 192:384], gate[:, 192:384]
    ones_padding = s13.clone()
    ones_padding[:, 1], ones_padding[:, 3] = 1.0, 1.0
    for wrong in (gate_first.view(w13.dtype), stride_192.view(w13.dtype)):
        assert harness.describe_difference("w13_weight", w13, wrong) is not None
    assert harness.describe_difference("w13_weight_scale_inv", s13, ones_padding) is not None
    assert bool((s13[:, 1] == 0).all() and (s13[:, 3] == 0).all())  # SGLang zeroes the padded scale blocks


def test_sglang_refuses_what_it_cannot_shard(tiny_fp8):
    """TP5: mm-convert converts it (docs/VERIFIED.md, correction 2); SGLang asserts 384 % 5 == 0."""
    with pytest.raises(AssertionError):
        harness.load_rank(tiny_fp8, 5, 1, 0)


def main() -> None:
    """Print the result table of docs/SGLANG_PARITY.md (python -m tests.parity.test_sglang_parity)."""
    import tempfile
    import time

    from mm_convert.read.tiny import TINY

    print("| source | tp | ep | I_p | experts/rank | all-zero ranks | bytes compared | byte-identical ranks | unchanged by post-load |")
    print("|---|---|---|---|---|---|---|---|---|")
    started = time.monotonic()
    ranks = 0
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_synthetic(Path(tmp) / "tiny-fp8", TINY, "fp8", seed=0)
        real = real_shape_source(Path(tmp))
        for label, src, shapes in (("tiny", tiny, SHAPES), ("real-shape", real, REAL_SHAPES)):
            for tp, ep in shapes:
                out = _converted(src, Path(tmp), tp, ep)
                same = unchanged = zero = nbytes = 0
                for r in range(tp):
                    s = harness.load_rank(src, tp, ep, r)
                    ours = {k: v for k, v in mm_convert_rank(out, tp, ep, r).items() if ".block_sparse_moe.experts." in k}
                    same += not harness.compare(s.loaded, ours)
                    unchanged += s.processed is not None and not harness.compare(s.loaded, s.processed)
                    nbytes += sum(t.numel() * t.element_size() for t in s.loaded.values())
                    zero += all(not bool(t.view(torch.uint8).any()) for k, t in s.loaded.items() if k.endswith("_weight"))
                    info = s.info
                    ranks += 1
                print(f"| {label} | {tp} | {ep} | {info['intermediate_size_per_partition']} | {info['num_local_experts']} "
                      f"| {zero} | {nbytes:,} | {same}/{tp} | {unchanged}/{tp} |")
    print(f"\n{ranks} ranks in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
