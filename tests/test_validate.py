"""`mm-convert validate`: passes correct conversions, fails every planted defect with a message that
names it, also when the manifest hashes were rewritten to match the damaged files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mm_convert.commands.convert import ConvertOptions, convert
from tests import defects
from mm_convert.validators.routing import pack_topk, route, unpack_topk
from mm_convert.validators.run import validate


@pytest.fixture(scope="module")
def good(tiny_fp8, tiny_bf16, tmp_path_factory):
    """Correct conversions: (source, output) per (kind, layout, tp, ep); layout is an experts-format
    profile (sglang, trtllm) or presharded (the sglang profile as SGLang holds the whole rank, for SM100)."""
    base = tmp_path_factory.mktemp("validate")
    made = {}
    for kind, src in (("fp8", tiny_fp8), ("bf16", tiny_bf16)):
        for layout in ("sglang", "trtllm", "presharded"):
            for tp, ep in ((4, 1), (2, 2), (4, 2)):
                out = base / f"{kind}-{layout}-tp{tp}-ep{ep}"
                options = ConvertOptions(tp=tp, ep=ep, quiet=True) if layout == "presharded" else \
                    ConvertOptions(profile=layout, format="experts", tp=tp, ep=ep, quiet=True)
                convert(src, out, options)
                made[(kind, layout, tp, ep)] = (src, out)
    return made


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
@pytest.mark.parametrize("profile", ["sglang", "trtllm", "presharded"])
@pytest.mark.parametrize("tp,ep", [(4, 1), (2, 2), (4, 2)])
def test_correct_conversions_pass(good, kind, profile, tp, ep):
    src, out = good[(kind, profile, tp, ep)]
    report = validate(out, src, kernel="reference", layers=[0, 2], tokens=32)
    assert report.passed, report.render()
    checks = report.by_check()
    assert checks["structure"]["pass"] >= 5 and checks["exact"]["pass"] >= 3
    exact = " ".join(f.message for f in report.findings if f.check == "exact")
    # presharded: every rank's non-expert slices too; experts format: the pass-through shards
    assert ("non-expert tensors of" in exact) == (profile == "presharded")
    assert checks["kernel"]["pass"] == 2  # layers 0 and 2
    if kind == "bf16":
        assert checks["quant-error"]["pass"] == 1
        q = next(f for f in report.findings if f.check == "quant-error")
        assert 0.01 < q.metrics["mean_rel_l2"] < 0.05  # FP8 e4m3 on Gaussian weights: about 2.7%
    rows = report.kernel_rows()
    assert all(r.metrics["rel_l2"] < 1e-5 and r.metrics["within_tolerance"] == 1.0 for r in rows)


def test_without_source_exactness_runs_against_the_recorded_digests(good):
    _, out = good[("fp8", "trtllm", 4, 2)]
    report = validate(out, None, kernel="reference")
    assert report.passed and report.by_check()["exact"]["pass"] == 1
    assert report.layers == [0, 1, 2]  # default spread: first, middle, last
    assert "against the source digests the manifest records" in report.render()


def _copy(good, key, tmp_path) -> tuple[Path, Path]:
    src, out = good[key]
    dst = tmp_path / "damaged"
    shutil.copytree(out, dst)
    return src, dst


def _failures(report, check):
    return [f for f in report.failures() if f.check == check]


def test_swapped_gate_up_named(good, tmp_path):
    src, out = _copy(good, ("fp8", "sglang", 4, 2), tmp_path)
    # TP4 EP2 (moe_tp 2): rank 3 holds experts 6-11 and rows 256-383 of I=384 (I_p 256, half padding).
    defects.swap_gate_up(out, "tp4-ep2", rank=3, layer=1, local_expert=2, padded=256)
    defects.forge_manifest(out)
    report = validate(out, src, kernel="reference", layers=[1])
    assert not report.passed
    exact = _failures(report, "exact")
    assert len(exact) == 1
    f = exact[0]
    assert (f.layer, f.expert, f.rank, f.shape) == (1, 8, 3, "tp4-ep2")
    assert "gate and up halves of w13_weight are swapped" in f.message
    assert "[exact] FAIL shape tp4-ep2 layer 1 expert 8 rank 3" in f.line()
    assert _failures(report, "kernel")  # the routed MoE output is wrong too
    assert not _failures(report, "structure")  # the forged manifest hides it from the hash check


def test_altered_scale_block_named(good, tmp_path):
    src, out = _copy(good, ("bf16", "trtllm", 2, 2), tmp_path)
    defects.alter_scale_block(out, "tp2-ep2", rank=0, layer=2, local_expert=5)
    defects.forge_manifest(out)
    report = validate(out, src, kernel="reference", layers=[2])
    exact = _failures(report, "exact")
    assert [(f.layer, f.expert, f.rank) for f in exact] == [(2, 5, 0)]
    assert "w2_weight_scale_inv differ" in exact[0].message


def test_missing_rank_file_named(good, tmp_path):
    src, out = _copy(good, ("fp8", "sglang", 4, 1), tmp_path)
    (out / "experts/tp4-ep1/rank-2-part-0.safetensors").unlink()
    defects.forge_manifest(out)
    report = validate(out, src, kernel="reference", layers=[0])
    structure = _failures(report, "structure")
    assert any(f.rank == 2 and "rank-2-part-0.safetensors: missing" in f.message for f in structure)
    assert any(f.expert is not None and "present 0 times" in f.message for f in structure)
    assert not report.passed


def test_double_shuffle_named(good, tmp_path):
    src, out = _copy(good, ("fp8", "trtllm", 4, 1), tmp_path)
    defects.shuffle_again(out, "tp4-ep1", rank=1, layer=0)
    defects.forge_manifest(out)
    report = validate(out, src, kernel="reference", layers=[0])
    exact = _failures(report, "exact")
    assert exact and all((f.layer, f.rank) == (0, 1) for f in exact)
    assert {f.expert for f in exact} == set(range(12))
    assert all("w13_weight up half (w3), w13_weight gate half (w1) differ" in f.message for f in exact)
    assert any(f.layer == 0 for f in _failures(report, "kernel"))


@pytest.mark.parametrize("edit,expect", [
    (lambda b: b.update(profile="trtllm", use_shuffled_weight=True, weight_layout=2), "expects F8_E4M3"),
    (lambda b: b.update(weight_layout=2), "do not match profile"),
    (lambda b: b.update(tp=8), "disagrees with shapes[0]"),
    (lambda b: b["shapes"][0].update(padded_intermediate_size=256), "padded_intermediate_size = 256, expected 128"),
])
def test_wrong_config_block_named(good, tmp_path, edit, expect):
    src, out = _copy(good, ("fp8", "sglang", 4, 1), tmp_path)
    config = json.loads((out / "config.json").read_text())
    edit(config["mm_convert"])
    (out / "config.json").write_text(json.dumps(config))
    defects.forge_manifest(out)
    report = validate(out, src, kernel="reference", layers=[0])
    assert not report.passed
    assert any(expect in f.message for f in _failures(report, "structure")), report.render()


def test_manifest_mismatch_without_forging(good, tmp_path):
    src, out = _copy(good, ("fp8", "sglang", 4, 1), tmp_path)
    path = out / "experts/tp4-ep1/rank-0-part-0.safetensors"
    with open(path, "r+b") as f:  # one flipped bit in the last tensor, size unchanged
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0x01]))
    report = validate(out, src, kernel="reference", layers=[0])
    structure = _failures(report, "structure")
    assert [f.message for f in structure] == ["experts/tp4-ep1/rank-0-part-0.safetensors: sha256 differs from the manifest"]
    assert [(f.layer, f.rank) for f in _failures(report, "exact")] == [(2, 0)]


def test_cli_exit_codes_and_json_report(cli, good, tmp_path):
    src, out = good[("bf16", "sglang", 2, 2)]
    report_path = tmp_path / "report.json"
    r = cli("validate", out, "--source", src, "--kernel", "reference", "--layers", "0,2", "--report", report_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT: PASS" in r.stdout
    data = json.loads(report_path.read_text())
    assert data["passed"] and data["layers"] == [0, 2] and data["kernel_used"] == "reference"
    assert {f["check"] for f in data["findings"]} == {"structure", "exact", "quant-error", "kernel"}
    _, damaged = _copy(good, ("bf16", "sglang", 2, 2), tmp_path)
    defects.swap_gate_up(damaged, "tp2-ep2", rank=1, layer=0, local_expert=0, padded=384)
    defects.forge_manifest(damaged)
    r = cli("validate", damaged, "--source", src, "--kernel", "reference", "--layers", "0")
    assert r.returncode != 0
    assert "[exact] FAIL shape tp2-ep2 layer 0 expert 6 rank 1: gate and up halves" in r.stdout
    r = cli("validate", out, "--kernel", "nonsense")
    assert r.returncode != 0 and "choose one of" in r.stderr


def test_routing_follows_the_spec():
    g = torch.Generator().manual_seed(0)
    hidden, gate, bias = torch.randn(16, 256, generator=g), torch.randn(12, 256, generator=g), torch.randn(12, generator=g)
    r = route(hidden, gate, bias, top_k=4)
    for t in range(16):
        scores = [1 / (1 + float(torch.exp(-(hidden[t].double() @ gate[e].double())))) for e in range(12)]
        chosen = sorted(range(12), key=lambda e: -(scores[e] + float(bias[e])))[:4]
        assert sorted(r.ids[t].tolist()) == sorted(chosen)
        total = sum(scores[e] for e in chosen)
        for slot, e in enumerate(r.ids[t].tolist()):
            assert abs(r.weights[t, slot].item() - scores[e] / total) < 4e-3  # bf16-rounded
    ids, weights = unpack_topk(r.packed)
    assert torch.equal(ids, r.ids) and torch.equal(weights, r.weights)


def test_packing_survives_negative_weights():
    ids = torch.tensor([[3, 255]])
    w = torch.tensor([[-0.5, 0.25]])
    packed = pack_topk(ids, w)
    assert packed.dtype == torch.int32 and (packed[0, 0] >> 16).item() == 3
    back_ids, back_w = unpack_topk(packed)
    assert back_ids.tolist() == [[3, 255]] and back_w.tolist() == [[-0.5, 0.25]]


# -- presharded folders ------------------------------------------------------------------------------


def _presharded_folder(out: Path) -> Path:
    (root,) = [p for p in out.iterdir() if p.name.startswith("presharded-")]
    (folder,) = list(root.iterdir())
    return folder


def test_presharded_wrong_rank_checksum_named(good, tmp_path):
    src, out = _copy(good, ("fp8", "presharded", 4, 2), tmp_path)
    path = _presharded_folder(out) / "checksum.json"
    plan = json.loads(path.read_text())
    plan["rank_checksums"]["2"] = "0123456789abcdef"
    path.write_text(json.dumps(plan, indent=2))
    defects.forge_manifest(out)
    report = validate(out, None, kernel="reference", layers=[0])
    structure = _failures(report, "structure")
    assert [f.rank for f in structure] == [2] and "rank checksum '0123456789abcdef'" in structure[0].message


def test_presharded_swapped_gate_up_named(good, tmp_path):
    """Halves swapped and the folder made self-consistent again (keys, checksums, manifest): only the
    source can tell, and it does, naming the expert."""
    src, out = _copy(good, ("fp8", "presharded", 4, 2), tmp_path)
    defects.presharded_edit(out, rank=3, name="model.layers.1.block_sparse_moe.experts.w13_weight",
                            change=lambda w: defects.swapped_halves(w, local_expert=2, padded=256))
    report = validate(out, src, kernel="reference", layers=[1])
    assert not _failures(report, "structure")
    exact = _failures(report, "exact")
    assert [(f.layer, f.expert, f.rank) for f in exact] == [(1, 8, 3)]
    assert "gate and up halves of w13_weight are swapped" in exact[0].message
    assert _failures(report, "kernel")


def test_presharded_wrong_qkv_slice_named(good, tmp_path):
    """Rank 1 given rank 0's qkv_proj (a plausible off-by-one-rank slice), made self-consistent."""
    src, out = _copy(good, ("fp8", "presharded", 4, 1), tmp_path)
    name = "model.layers.2.self_attn.qkv_proj.weight"
    rank0 = defects.presharded_tensor(out, rank=0, name=name)
    defects.presharded_edit(out, rank=1, name=name, change=lambda w: rank0.clone())
    report = validate(out, src, kernel="reference", layers=[2])
    assert not _failures(report, "structure")
    exact = _failures(report, "exact")
    assert [(f.rank, f.check) for f in exact] == [(1, "exact")]
    assert exact[0].message.startswith(f"{name} differs from model.layers.2.self_attn.q_proj.weight")


def test_presharded_flipped_byte_caught_without_source(good, tmp_path):
    """verify_on_load's own check, before SGLang runs: a stored tensor that no longer hashes to its key."""
    _, out = _copy(good, ("fp8", "presharded", 2, 2), tmp_path)
    data = max(_presharded_folder(out).glob("*.safetensor"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[-7] ^= 0x10
    data.write_bytes(bytes(raw))
    defects.forge_manifest(out)
    report = validate(out, None, kernel="reference", layers=[0])
    assert any("no longer hashes to its key" in f.message for f in _failures(report, "structure"))


def test_presharded_top_level_weights_refused(good, tmp_path):
    _, out = _copy(good, ("fp8", "presharded", 2, 2), tmp_path)
    shutil.copy(next(_presharded_folder(out).glob("*-common.safetensor")), out / "model.safetensors")
    report = validate(out, None, kernel="reference", layers=[0])
    assert any("holds no top-level weights" in f.message for f in _failures(report, "structure"))
