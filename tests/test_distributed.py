"""The distributed kernel check on CPU: real torch.distributed process groups (gloo), one process
per rank or several ranks per process, against the single-process check's numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mm_convert.commands.convert import ConvertOptions, convert
from mm_convert.validators.checkpoint import ConvertedCheckpoint
from mm_convert.validators.distributed import launch
from mm_convert.validators.run import validate

PROFILES = {"sglang": {}, "trtllm": {"profile": "trtllm", "format": "experts"}}


@pytest.fixture(scope="module")
def tp4(tiny_fp8, tmp_path_factory) -> dict[str, Path]:
    outs = {}
    for name, options in PROFILES.items():
        outs[name] = tmp_path_factory.mktemp(f"dist-{name}") / "out"
        convert(tiny_fp8, outs[name], ConvertOptions(tp=4, quiet=True, **options))
    return outs


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("profile", list(PROFILES))
def test_distributed_check_matches_the_single_process_one(tp4, tiny_fp8, profile, world):
    out = tp4[profile]
    single = validate(out, tiny_fp8, "reference", device="cpu")
    dist = launch(out, world, tiny_fp8, "reference", device="cpu")
    assert single.passed and dist.passed, dist.render()
    assert dist.distributed["world_size"] == world and dist.distributed["backend"] == "gloo"
    processes = dist.distributed["processes"]
    assert sorted(r for p in processes for r in p["ranks"]) == [0, 1, 2, 3]  # every rank, once
    assert all(p["peak_bytes"] > 0 and p["seconds"] >= 0 for p in processes)
    with ConvertedCheckpoint.open(out) as ckpt:  # rank 3 of TP4 holds only padding on the tiny model
        assert ckpt.ranks(ckpt.block.shapes[0])[3].real_rows == 0
    one, many = single.kernel_rows(), dist.kernel_rows()
    assert [(f.shape, f.layer, f.status) for f in one] == [(f.shape, f.layer, f.status) for f in many]
    for a, b in zip(one, many):
        # The same sums in another order (the reference too is summed rank by rank): rounding only.
        assert abs(a.metrics["rel_l2"] - b.metrics["rel_l2"]) < 1e-6
        assert abs(a.metrics["cosine"] - b.metrics["cosine"]) < 1e-9
        assert len(b.metrics["process_seconds"]) == world
    assert {f.check for f in dist.findings} >= {"structure", "exact", "kernel"}


def test_bf16_source_reports_the_quantisation_error_distributed(tiny_bf16, tmp_path):
    out = tmp_path / "out"
    convert(tiny_bf16, out, ConvertOptions(tp=2, quiet=True))
    single = validate(out, tiny_bf16, "reference", device="cpu")
    dist = launch(out, 2, tiny_bf16, "reference", device="cpu")
    assert dist.passed, dist.render()
    for a, b in zip(single.kernel_rows(), dist.kernel_rows()):
        assert b.metrics["vs_source_rel_l2"] == pytest.approx(a.metrics["vs_source_rel_l2"], rel=1e-4)
        assert b.metrics["vs_source_rel_l2"] > 1e-3  # the real FP8 error, not the layout's


def test_a_partial_folder_runs_only_its_ranks(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=4, ranks=(0, 1), quiet=True))
    dist = launch(out, 4, tiny_fp8, "reference", device="cpu")
    assert dist.passed, dist.render()
    assert sorted(r for p in dist.distributed["processes"] for r in p["ranks"]) == [0, 1]


def test_a_world_that_does_not_divide_tp_is_not_a_pass(tp4, tiny_fp8):
    dist = launch(tp4["sglang"], 3, tiny_fp8, "reference", device="cpu")
    assert not dist.passed and dist.incomplete
    assert any("does not divide tp 4" in f.message for f in dist.skipped())


class _DropsRankOne:
    """A backend that loses rank 1's contribution, as a broken collective or placement would."""

    def __init__(self, inner):
        self.inner, self.name, self.tolerance, self.device = inner, "drops-rank-1", inner.tolerance, inner.device

    def run(self, inputs, weights, out):
        self.inner.run(inputs, weights, out)
        if os.environ["RANK"] == "1":  # process 1 runs ranks 1 and 3
            out.zero_()


def _faulty_process(rank: int, world: int, rendezvous: str, out: str, source: str, report: str) -> None:
    from mm_convert.validators import distributed
    from mm_convert.validators.kernels import select as select_module

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      **{distributed.RENDEZVOUS_ENV: rendezvous})
    real = select_module.select

    def faulty(kernel, flags, device=None):
        chosen = real(kernel, flags, device)
        return select_module.Selection(_DropsRankOne(chosen.backend), chosen.note)

    distributed.select = faulty
    result = distributed.run_process(out, source, "reference", None, 16, 0, "cpu")
    if result is not None:
        result.save(Path(report))


def test_a_lost_partial_output_fails_the_check(tp4, tiny_fp8, tmp_path):
    report = tmp_path / "report.json"
    torch.multiprocessing.spawn(_faulty_process, args=(2, f"file://{tmp_path}/rdzv", str(tp4["sglang"]), str(tiny_fp8),
                                                       str(report)), nprocs=2, join=True)
    data = json.loads(report.read_text())
    kernel = [f for f in data["findings"] if f["check"] == "kernel"]
    assert kernel and all(f["status"] == "fail" for f in kernel), kernel
    assert data["passed"] is False


def test_cli_distributed_json(cli, tp4, tiny_fp8):
    r = cli("validate", tp4["trtllm"], "--source", tiny_fp8, "--kernel", "reference", "--device", "cpu",
            "--distributed", "--world-size", "2", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["distributed"]["world_size"] == 2
    bad = cli("validate", tp4["trtllm"], "--world-size", "2")
    assert bad.returncode == 1 and "--world-size applies to --distributed" in bad.stderr
