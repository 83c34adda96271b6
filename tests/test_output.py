"""The output folder as SPEC section 5 describes it: pass-through shards, config block, manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mm_convert.commands.convert import ConvertOptions, convert
from mm_convert.errors import OutputError
from tests.checkpoint_io import as_bytes, load_all, load_file


@pytest.fixture(scope="module")
def converted(tiny_fp8, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "tp4"
    convert(tiny_fp8, out, ConvertOptions(profile="trtllm", tp=4, ep=2, part_size=1_500_000, quiet=True))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_expert_tensors_unchanged(tiny_fp8, converted):
    src = load_all(tiny_fp8)
    out = load_all(converted)  # the standard shards, through their index
    expected = {k for k in src if ".experts." not in k}
    assert set(out) == expected
    for name in expected:
        assert out[name].dtype == src[name].dtype and out[name].shape == src[name].shape
        assert torch.equal(as_bytes(out[name]), as_bytes(src[name])), name
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())


def test_parts_hold_whole_layers_within_the_bound(converted):
    files = sorted((converted / "experts" / "tp4-ep2").glob("*.safetensors"))
    assert len(files) == 4 * 3  # 1.5 MB parts: one layer per part here, 3 parts per rank
    for path in files:
        layers = {int(k.split(".")[2]) for k in load_file(path)}
        assert len(layers) == 1
        kinds = sorted(k.split(".")[-1] for k in load_file(path))
        assert kinds == ["w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"]
        assert path.stat().st_size <= 1_500_000


def test_config_block_and_copied_files(tiny_fp8, converted):
    src_config = json.loads((tiny_fp8 / "config.json").read_text())
    config = json.loads((converted / "config.json").read_text())
    block = config.pop("mm_convert")
    assert config == src_config  # everything else kept, quantization_config included
    assert (block["profile"], block["tp"], block["ep"], block["moe_tp"]) == ("trtllm", 4, 2, 2)
    assert block["padded_intermediate_size"] == 256  # 384 // 2 = 192 -> 256
    assert (block["use_shuffled_weight"], block["weight_layout"]) == (True, 2)
    assert block["shapes"][0]["dir"] == "experts/tp4-ep2"
    for name in ("tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                 "modeling_minimax_m2.py", "configuration_minimax_m2.py", "LICENSE"):
        assert (converted / name).read_bytes() == (tiny_fp8 / name).read_bytes(), name


def test_manifest_hashes_match_files(converted):
    manifest = json.loads((converted / "mm_convert.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {str(p.relative_to(converted)) for p in converted.rglob("*") if p.is_file()}
    assert on_disk - set(listed) == {"mm_convert.json"}
    for rel, rec in listed.items():
        path = converted / rel
        assert path.stat().st_size == rec["size"]
        assert _sha256(path) == rec["sha256"], rel
    census = manifest["census"]
    assert census["source_expert_tensors"] == 3 * 12 * 3 * 2  # weights + scales
    assert census["output_expert_tensors"] == 4 * 3 * 4
    assert census["output_by_dtype"]["F8_E4M3"]["tensors"] > 0
    assert manifest["source"]["kind"] == "fp8" and len(manifest["source"]["files"]) == 4
    assert not (converted / ".mm-convert").exists()


def test_bf16_source_gets_fp8_quantization_config(tiny_bf16, tmp_path):
    out = tmp_path / "out"
    convert(tiny_bf16, out, ConvertOptions(tp=2, format="experts", quiet=True))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert "self_attn" in config["quantization_config"]["modules_to_not_convert"]
    assert config["mm_convert"]["source_kind"] == "bf16"
    # Attention stays BF16, bytes unchanged.
    src, got = load_all(tiny_bf16), load_all(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], src[name])


def test_second_shape_sits_beside_the_first(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=4, format="experts", quiet=True))
    first = json.loads((out / "mm_convert.json").read_text())
    result = convert(tiny_fp8, out, ConvertOptions(tp=2, ep=2, format="experts", quiet=True))
    kept = [f for f in first["files"] if f["path"].endswith(".safetensors") and not f["path"].startswith("experts/")]
    assert result.files_reused == len(kept) > 0  # the non-expert shards are verified and kept, not rewritten
    config = json.loads((out / "config.json").read_text())
    assert [(s["tp"], s["ep"]) for s in config["mm_convert"]["shapes"]] == [(4, 1), (2, 2)]
    manifest = json.loads((out / "mm_convert.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {f["path"] for f in first["files"] if f["path"].startswith("experts/")} <= paths
    assert any(p.startswith("experts/tp2-ep2/") for p in paths)
    with pytest.raises(OutputError, match="profile"):
        convert(tiny_fp8, out, ConvertOptions(profile="trtllm", tp=8, quiet=True))


def test_rerun_reuses_everything_and_is_identical(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=2, quiet=True))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = convert(tiny_fp8, out, ConvertOptions(tp=2, quiet=True))
    assert result.bytes_written < 10_000  # only config/index/aux are rewritten
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after
