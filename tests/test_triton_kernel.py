"""Our Triton routed FP8 MoE kernel: its logic at tiny sizes under Triton's interpreter (no GPU),
and the host-side grouping of tokens by expert. The GPU runs are in bench/gpu_kernel.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mm_convert.commands.convert import ConvertOptions, convert
from tests.conftest import REPO

triton = pytest.importorskip("triton", reason="Triton is not installed")


@pytest.fixture(scope="module")
def per_rank_cases(tiny_fp8, tiny_bf16, tmp_path_factory):
    base = tmp_path_factory.mktemp("triton")
    folders = []
    # TP1 (all rows), TP4 (rank 3 all zeros), TEP4-like TP4 EP4 (3 experts per rank), both profiles.
    for src, profile, tp, ep in ((tiny_fp8, "sglang", 1, 1), (tiny_fp8, "trtllm", 4, 1),
                                 (tiny_bf16, "sglang", 4, 4), (tiny_fp8, "trtllm", 4, 4), (tiny_bf16, "trtllm", 2, 1)):
        out = base / f"{profile}-tp{tp}-ep{ep}-{src.name}"
        convert(src, out, ConvertOptions(profile=profile, format="experts", tp=tp, ep=ep, quiet=True))
        folders.append(str(out))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "triton_interpreter_cases.py"), *folders],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_case_ran(per_rank_cases):
    assert len(per_rank_cases) == 3 * (1 + 4 + 4 + 4 + 2)


def test_kernel_matches_torch_emulation(per_rank_cases):
    for case in per_rank_cases:
        assert case["nan"] == 0, case  # the poisoned output was fully written
        if case["all_zero"] and case["ref_rms"] == 0:
            continue  # no token reached this rank's experts
        assert case["rel_l2"] < 3e-3 and case["cosine"] > 0.99999, case


def test_zero_filled_rank_outputs_zero(per_rank_cases):
    zero = [c for c in per_rank_cases if c["zero_rank"]]
    assert zero and all(c["all_zero"] for c in zero)


def test_group_by_expert():
    from mm_convert.validators.kernels.triton_moe import group_by_expert

    local = torch.tensor([[2, -1], [0, 2], [2, 1]])  # 3 tokens, top-2; -1: another rank's expert
    rows, block_expert = group_by_expert(local, local_experts=4, block_m=2)
    assert block_expert.tolist() == [0, 1, 2, 2]  # expert 2 has 3 rows: two blocks
    assert rows.tolist() == [2, -1, 5, -1, 0, 3, 4, -1]
