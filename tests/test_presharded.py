"""The `presharded` output format (SGLang's --load-format presharded) without SGLang: layout rules,
subsets, safety properties and the SM100 re-quantisation. SGLang's own loader proves the folders in
the SGLang tier (tests/parity/test_sglang_presharded.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import xxhash

from mm_convert.plan import presharded
from mm_convert.commands.convert import ConvertOptions, convert
from mm_convert.transform.quant import dequantize_fp8_block, packed_ue8m0_scale_shape, requant_ue8m0, unpack_ue8m0_scale
from mm_convert.plan.sglang_state import RankTensor, Rows, Assemble, vocab_rows
from tests.conftest import run_cli
from tests.test_reliability import tree_digest


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tp4(tiny_fp8, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("presharded") / "tp4"
    convert(tiny_fp8, out, ConvertOptions(tp=4, quiet=True))
    return out


def _folder(out: Path) -> Path:
    (root,) = [p for p in out.iterdir() if p.name.startswith("presharded-")]
    (folder,) = list(root.iterdir())
    return folder


# -- the folder ------------------------------------------------------------------------------------


def test_no_top_level_weights_and_root_named_for_backend_and_gpu(tp4):
    """SGLang's default loader must find nothing to load, and a launch with another backend must not
    find the folder at SGLang's default <model_path>/presharded."""
    assert not list(tp4.glob("*.safetensors")) and not (tp4 / "model.safetensors.index.json").exists()
    assert not (tp4 / "presharded").exists()
    folder = _folder(tp4)
    assert folder.parent.name == "presharded-flashinfer_trtllm_routed-sm100"
    assert folder.name.startswith("TP-4-sig-") and len(folder.name) == len("TP-4-sig-") + 16
    assert {"checksum.json", "READY"} <= {p.name for p in folder.iterdir()}


def test_checksum_json_is_consistent_with_the_files(tp4):
    """Every read names a stored tensor whose bytes hash to its key; rank checksums follow SGLang's rule."""
    folder = _folder(tp4)
    plan = json.loads((folder / "checksum.json").read_text())
    assert plan["version"] == 1 and plan["world_size"] == 4
    from safetensors import safe_open

    keys = {}
    for f in plan["files"]:
        assert (f["rank_list"] is None) == f["is_common"]
        with safe_open(str(folder / f["filename"]), framework="pt") as st:
            assert set(st.keys()) == {t["stored_key"] for t in f["tensors"]}
            for key in st.keys():
                t = st.get_tensor(key)
                h = xxhash.xxh3_128(str(tuple(t.shape)).encode() + str(t.dtype).encode())
                h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                assert h.hexdigest() == key
                keys[key] = f["filename"]
        assert sum(t["size"] for t in f["tensors"]) <= presharded.MAX_FILE_BYTES
    for rank, reads in plan["rank_to_reads"].items():
        total = 0
        for r in reads:
            assert keys[r["stored_key"]] == r["filename"]
            digest = xxhash.xxh3_128((r["name"] + ":" + r["stored_key"]).encode()).digest()
            total = (total + int.from_bytes(digest[:8], "big")) % 2**64
        assert plan["rank_checksums"][rank] == f"{total:016x}"
    # tensors held by every rank sit in common files; deduplication leaves one copy of each content
    all_keys = [t["stored_key"] for f in plan["files"] for t in f["tensors"]]
    assert len(all_keys) == len(set(all_keys))


def test_all_zero_rank_is_deduplicated(tp4):
    """TP4 of intermediate 384: rank 3 holds no rows, so its expert tensors are zeros, stored once."""
    plan = json.loads((_folder(tp4) / "checksum.json").read_text())
    reads = {r["name"]: r["stored_key"] for r in plan["rank_to_reads"]["3"]}
    w13 = {reads[f"model.layers.{layer}.block_sparse_moe.experts.w13_weight"] for layer in range(3)}
    assert len(w13) == 1


def test_dedup_layout_rules():
    """Equal contents are stored once, in files shared by exactly the ranks that hold them, layer by
    layer, in the producing rank's stream order, split at the size limit; a content that turns out
    repeated within a file is one entry of checksum.json."""
    def t(name: str, n: int) -> RankTensor:
        return RankTensor(name, "U8", (n,), Assemble(0, (Rows("x", 0, n),)))

    names = ["model.layers.0.a", "model.layers.0.b", "model.layers.0.c", "model.layers.1.a", "lm_head.weight"]
    states = [[t(n, 10) for n in names] for _ in range(2)]
    ids = [["a0", "b-rank0", "c", "a0", "head0"], ["a0", "b-rank1", "c", "a0", "head1"]]
    files = presharded.layout(states, ids, num_layers=2, max_file_bytes=15)
    assert [(f.name, [s.holders for s in f.tensors]) for f in files] == [
        ("model-00000-common.safetensor", [((0, "model.layers.0.a"), (0, "model.layers.1.a"),
                                            (1, "model.layers.0.a"), (1, "model.layers.1.a"))]),
        ("model-00001-common.safetensor", [((0, "model.layers.0.c"), (1, "model.layers.0.c"))]),
        ("model-00002-rank-000.safetensor", [((0, "model.layers.0.b"),)]),
        ("model-00003-rank-001.safetensor", [((1, "model.layers.0.b"),)]),
        ("model-00004-rank-000.safetensor", [((0, "lm_head.weight"),)]),
        ("model-00005-rank-001.safetensor", [((1, "lm_head.weight"),)]),
    ]
    keys = [["k_a"], ["k_c"], ["k_b0"], ["k_b1"], ["k_h0"], ["k_h1"]]
    plan = presharded.checksum_json(files, keys, 2, {"tp": 2})
    assert [(r["name"], r["stored_key"]) for r in plan["rank_to_reads"]["1"]] == [
        ("model.layers.0.a", "k_a"), ("model.layers.1.a", "k_a"), ("model.layers.0.c", "k_c"),
        ("model.layers.0.b", "k_b1"), ("lm_head.weight", "k_h1")]
    # two stored tensors of one file found to hold the same bytes: one entry, both names
    twice = presharded.LayoutFile("f.safetensor", (0,), False, (
        presharded.StoredTensor("U8", (10,), 10, ((0, "x"),)), presharded.StoredTensor("U8", (10,), 10, ((0, "y"),))))
    merged = presharded.checksum_json([twice], [["k", "k"]], 1, {})
    assert merged["files"][0]["tensors"] == [{"stored_key": "k", "size": 10, "rank_to_names": {"0": ["x", "y"]}}]
    assert [r["name"] for r in merged["rank_to_reads"]["0"]] == ["x", "y"]


def test_vocab_rows_follow_vocab_parallel_embedding():
    # 512 / 4: no padding; 200064 (MiniMax) / 8: 25008 each; 100 / 3: padded to 192 (64 x 3), 64 each.
    assert vocab_rows(512, 4, 3) == (384, 128, 128)
    assert vocab_rows(200064, 8, 7) == (7 * 25008, 25008, 25008)
    assert vocab_rows(100, 3, 1) == (64, 36, 64) and vocab_rows(100, 3, 2) == (100, 0, 64)


# -- subsets and resume ----------------------------------------------------------------------------


def test_rank_subsets_are_byte_identical_to_a_full_run(tiny_fp8, tp4, tmp_path):
    full = _digests(tp4 / _folder(tp4).relative_to(tp4))
    parts = {}
    for ranks in ("0,1", "3"):
        out = tmp_path / f"ranks-{ranks}"
        r = run_cli("convert", tiny_fp8, out, "--tp", "4", "--ranks", ranks, "-q")
        assert r.returncode == 0, r.stderr
        parts[ranks] = _digests(_folder(out))
        assert parts[ranks].items() <= full.items()  # every file it wrote is the full run's, byte for byte
        plan = json.loads((_folder(out) / "checksum.json").read_text())
        wanted = {int(x) for x in ranks.split(",")}
        read = {r["filename"] for rank in wanted for r in plan["rank_to_reads"][str(rank)]}
        assert {n for n in parts[ranks] if n.endswith(".safetensor")} == read  # exactly what those ranks read
    assert set(parts["0,1"]) | set(parts["3"]) != set(full)  # rank 2's own files are in neither


def test_adding_ranks_to_a_subset_completes_the_folder(tiny_fp8, tp4, tmp_path):
    out = tmp_path / "grow"
    assert run_cli("convert", tiny_fp8, out, "--tp", "4", "--ranks", "0-1", "-q").returncode == 0
    r = run_cli("convert", tiny_fp8, out, "--tp", "4", "--ranks", "2,3")
    assert r.returncode == 0, r.stderr
    assert _digests(_folder(out)) == _digests(_folder(tp4))
    shape = json.loads((out / "config.json").read_text())["mm_convert"]["shapes"][0]
    assert shape["ranks"] is None  # every rank is there now


def test_two_gpus_sit_side_by_side(tiny_fp8, tmp_path):
    out = tmp_path / "both"
    for arch in ("sm100", "sm90"):
        assert run_cli("convert", tiny_fp8, out, "--tp", "2", "--gpu-arch", arch, "-q").returncode == 0
    roots = sorted(p.name for p in out.iterdir() if p.name.startswith("presharded-"))
    assert roots == ["presharded-flashinfer_trtllm_routed-sm100", "presharded-flashinfer_trtllm_routed-sm90"]
    # SGLang's key is the same for both (it hashes the model as built, before post-processing) ...
    assert len({p.name for root in roots for p in (out / root).iterdir()}) == 1
    # ... and the states differ only in the attention linear layers
    assert run_cli("validate", out, "--kernel", "reference", "--layers", "0").returncode == 0


def test_convert_prints_the_launch_command(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", tiny_fp8, out, "--tp", "4", "--ep", "2", "-q")
    assert r.returncode == 0, r.stderr
    command = r.stdout.splitlines()[-1].strip()
    assert command.startswith("python -m sglang.launch_server --model-path ")
    for part in ("--tp-size 4", "--ep-size 2", "--moe-runner-backend flashinfer_trtllm_routed", "--quantization fp8",
                 "--load-format presharded", f'"presharded_path": "{out.resolve()}/presharded-flashinfer_trtllm_routed-sm100"',
                 '"verify_on_load": true'):
        assert part in command, part
    manifest = json.loads((out / "mm_convert.json").read_text())
    (shape,) = manifest["shapes"]
    assert (shape["format"], shape["gpu_arch"], shape["sglang_version"], shape["tp"], shape["ep"]) == \
        ("presharded", "sm100", "0.5.23", 4, 2)
    card = (out / "README.md").read_text()
    assert "--load-format presharded" in card and "0.5.23" in card and "Blackwell" in card
    assert str(out.resolve()) not in card  # the card says "$MODEL", not this machine's path


@pytest.mark.parametrize("args,message", [
    (["--profile", "trtllm", "--format", "presharded"], "needs --format experts"),
    (["--format", "experts", "--ranks", "0"], "--ranks applies to --format presharded"),
    (["--gpu-arch", "sm80"], "--gpu-arch 'sm80'"),
    (["--ranks", "4"], "ranks must lie in 0..3"),
    (["--tp", "3"], "num_attention_heads=8 is not divisible by tp=3"),
    (["--tp", "16"], "exceeds the 12 experts"),
])
def test_impossible_requests_refused_in_one_line(tiny_fp8, tmp_path, args, message):
    base = [] if "--tp" in args else ["--tp", "4"]
    r = run_cli("convert", tiny_fp8, tmp_path / "out", *base, *args)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_experts_format_still_written_on_request(tiny_fp8, tmp_path):
    out = tmp_path / "experts"
    assert run_cli("convert", tiny_fp8, out, "--tp", "2", "--format", "experts", "-q").returncode == 0
    assert (out / "experts" / "tp2-ep1" / "rank-1-part-0.safetensors").is_file()
    assert (out / "model.safetensors.index.json").is_file()


def test_source_untouched(tiny_fp8, tp4):
    before = tree_digest(tiny_fp8)
    convert(tiny_fp8, tp4.parent / "again", ConvertOptions(tp=2, quiet=True))
    assert tree_digest(tiny_fp8) == before


# -- SM100's re-quantisation -------------------------------------------------------------------------


def test_ue8m0_requant_properties():
    """Power-of-two block scales no smaller than amax/448, the packed layout decodes, values kept."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 256, (384, 640), dtype=torch.uint8, generator=gen)
    w[(w & 0x7F) == 0x7F] = 0
    scale = torch.rand(3, 5, generator=gen) * 1e-3 + 1e-5
    q, packed = requant_ue8m0(w, scale)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == packed_ue8m0_scale_shape((384, 640)) == (384, 2)
    new_scale = unpack_ue8m0_scale(packed, (384, 640))
    mantissa, _ = torch.frexp(new_scale)
    assert bool((mantissa == 0.5).all())  # powers of two
    before = dequantize_fp8_block(w.view(torch.float8_e4m3fn), scale)
    after = dequantize_fp8_block(q, new_scale)
    amax = before.abs().reshape(3, 128, 5, 128).amax(dim=(1, 3))
    assert bool((new_scale >= amax / 448).all()) and bool((new_scale < 2 * amax / 448 + 1e-30).all())
    assert float((after - before).norm() / before.norm()) < 0.05
    # rows of one 128-row block share their scales; K blocks past the end are zero bytes
    assert bool((packed[:128] == packed[0]).all())
    assert int(packed.view(torch.uint8).view(384, 8)[0, 5:].sum()) == 0
