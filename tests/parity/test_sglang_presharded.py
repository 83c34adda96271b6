"""SGLang 0.5.23's own loaders on a CPU prove mm-convert's `presharded` output (SPEC section 10).

For each launch shape, one process per rank (gloo) runs, in order, with SGLang's own argument
parser and model loaders (tests/parity/sglang_worker.py):

1. the default loader on the source (`--load-format auto`): the reference, for SM90 and, with
   SGLang's architecture checks patched, for SM100 (its DeepGEMM re-quantisation of the FP8
   linear layers runs on every rank);
2. the exact command `mm-convert convert` printed, on the converted folder, for each GPU: SGLang's
   `PreshardedModelLoader` must find the folder by its own key (a "first-time load and dump" is
   refused), re-hash every tensor (`verify_on_load`) and end with every rank's state byte-identical
   to the reference.

Then negative controls: a flipped byte, a missing tensor, a folder keyed for another launch, the
default loader pointed at the converted folder, a presharded launch without `presharded_path`,
and an SM90 folder launched on SM100: each must fail, never load other weights.

Run (from the repo root, in the venv of tests/parity/requirements.txt):
    /tmp/sgl-venv/bin/python -m pytest tests/parity -m sglang
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from mm_convert import model
from mm_convert.commands.convert import ConvertOptions, convert, serving_config
from mm_convert.transform.quant import quantize_fp8_block
from mm_convert.read.source import SourceCheckpoint
from mm_convert.read.tiny import REAL_LAYER, TINY, make_synthetic
from tests.parity import sglang_harness as harness
from tests.parity.sglang_launch import RankResult, run_ranks

pytestmark = pytest.mark.sglang

_WHY_NOT = harness.import_sglang()
if _WHY_NOT:
    pytest.skip(f"needs sglang=={harness.SGLANG_VERSION}: {_WHY_NOT}", allow_module_level=True)

BACKEND = "flashinfer_trtllm_routed"
# (tp, ep): TP4 leaves MoE-TP rank 3 all zero (384 rows / 4 = 96 -> 128) and replicates the 2 KV heads
# twice; TP4 EP4 puts 3 experts on each rank; TP4 EP2 mixes both; TP2 shards the KV heads.
SHAPES = [(4, 1), (4, 4), (4, 2), (2, 1)]
ARCHS = ("sm90", "sm100")


def _auto_command(src: Path, tp: int, ep: int) -> str:
    ep_flag = f" --ep-size {ep}" if ep > 1 else ""
    return (f"python -m sglang.launch_server --model-path {src} --tp-size {tp}{ep_flag} "
            f"--moe-runner-backend {BACKEND} --quantization fp8")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def differences(reference: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> list[str]:
    """Every way two rank states differ, one line each (empty: byte-identical)."""
    out = [f"{n}: only in SGLang's reference" for n in sorted(set(reference) - set(loaded))]
    out += [f"{n}: only in the presharded load" for n in sorted(set(loaded) - set(reference))]
    for n in sorted(set(reference) & set(loaded)):
        a, b = reference[n], loaded[n]
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{n}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
        elif not torch.equal(_bytes(a), _bytes(b)):
            out.append(f"{n}: {int((_bytes(a) != _bytes(b)).sum())} bytes differ")
    return out


def _convert(src: Path, out: Path, tp: int, ep: int, arch: str, **kw):
    return convert(src, out, ConvertOptions(tp=tp, ep=ep, gpu_arch=arch, quiet=True, **kw))


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("src") / "tiny-fp8", TINY, "fp8", seed=0)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("presharded")


@lru_cache(maxsize=None)
def _launch(src: str, out: str, tp: int, ep: int, jobs_dir: str) -> dict[str, list[RankResult]]:
    """Convert `src` for both GPUs into `out` and load both folders and the source with SGLang."""
    jobs = []
    for arch in ARCHS:
        result = _convert(Path(src), Path(out), tp, ep, arch)
        jobs.append({"id": f"auto-{arch}", "command": _auto_command(Path(src), tp, ep), "gpu_arch": arch})
        jobs.append({"id": f"presharded-{arch}", "command": result.launch_command, "gpu_arch": arch, "forbid_dump": True})
    return run_ranks(tp, jobs, Path(jobs_dir))


def test_same_key_checksums_and_keys_as_sglangs_own_dump(tiny_fp8, work):
    """SGLang's own "first-time load and dump" of the source, and mm-convert's offline folder: the same
    folder key, shard_config, rank checksums, and content key for every parameter of every rank (the
    files may split differently: SGLang's loader reads by checksum.json, not by file layout)."""
    tp, ep = 4, 2
    dump_root = work / "sglang-dump"
    command = (_auto_command(tiny_fp8, tp, ep) + " --load-format presharded --model-loader-extra-config "
               + json.dumps(json.dumps({"presharded_path": str(dump_root)})))
    results = run_ranks(tp, [{"id": "dump", "command": command, "gpu_arch": "sm90"}], work / "jobs-dump")
    assert all(r.ok and r.dumped for r in results["dump"]), [r.error for r in results["dump"]]
    (theirs,) = list(dump_root.iterdir())
    ours = _convert(tiny_fp8, work / "dump-compare", tp, ep, "sm90")
    mine = work / "dump-compare" / ours.shape.dir
    assert mine.name == theirs.name
    a, b = json.loads((theirs / "checksum.json").read_text()), json.loads((mine / "checksum.json").read_text())
    assert a["shard_config"] == b["shard_config"] and a["rank_checksums"] == b["rank_checksums"]
    for rank in map(str, range(tp)):
        assert {r["name"]: r["stored_key"] for r in a["rank_to_reads"][rank]} == \
            {r["name"]: r["stored_key"] for r in b["rank_to_reads"][rank]}
    stored = lambda plan: sorted(t["stored_key"] for f in plan["files"] for t in f["tensors"])  # noqa: E731
    assert stored(a) == stored(b)  # the same deduplication


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tp,ep", SHAPES)
def test_presharded_loads_byte_identical(tiny_fp8, work, tp, ep, arch):
    results = _launch(str(tiny_fp8), str(work / f"out-tp{tp}-ep{ep}"), tp, ep, str(work / f"jobs-tp{tp}-ep{ep}"))
    for rank in range(tp):
        ref, got = results[f"auto-{arch}"][rank], results[f"presharded-{arch}"][rank]
        assert ref.ok, f"rank {rank}: SGLang's default loader failed on the source: {ref.error}"
        assert got.ok, f"rank {rank}: SGLang's presharded loader failed: {got.error}"
        assert not got.dumped, f"rank {rank}: SGLang did not find the folder by its key"
        assert differences(ref.state(), got.state()) == [], f"rank {rank}"


def test_sm100_state_differs_from_sm90(tiny_fp8, work):
    """The GPU matters, so a folder is written for one: on SM100 SGLang re-quantises the FP8 linear
    layers (and packs their scales as int32); every other tensor is the same on both."""
    results = _launch(str(tiny_fp8), str(work / "out-tp4-ep1"), 4, 1, str(work / "jobs-tp4-ep1"))
    for rank in range(4):
        sm90, sm100 = results["auto-sm90"][rank].state(), results["auto-sm100"][rank].state()
        differ = {d.split(": ")[0] for d in differences(sm90, sm100)}
        assert differ == {f"model.layers.{layer}.self_attn.{proj}.{part}" for layer in range(TINY.num_layers)
                          for proj in ("qkv_proj", "o_proj") for part in ("weight", "weight_scale_inv")}
        assert sm100["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].dtype == torch.int32


# -- negative controls ----------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _folder(out: Path, arch: str) -> Path:
    return next((out / f"presharded-{BACKEND}-{arch}").iterdir())


@pytest.fixture(scope="module")
def negatives(tiny_fp8, work) -> dict[str, list[RankResult]]:
    tp, ep = 2, 1
    base = work / "neg-base"
    ok = _convert(tiny_fp8, base, tp, ep, "sm90")
    tp4 = _convert(tiny_fp8, work / "neg-tp4", 4, ep, "sm90")
    jobs = [{"id": "control", "command": ok.launch_command, "gpu_arch": "sm90", "forbid_dump": True}]

    def variant(name: str, edit) -> None:
        out = _copy(base, work / f"neg-{name}")
        edit(out)
        jobs.append({"id": name, "command": ok.launch_command.replace(str(base.resolve()), str(out.resolve())),
                     "gpu_arch": "sm90"})

    def flip_byte(out: Path) -> None:  # in a file every rank reads
        data = max(_folder(out, "sm90").glob("*-common.safetensor"), key=lambda p: p.stat().st_size)
        raw = bytearray(data.read_bytes())
        raw[-100] ^= 0x01
        data.write_bytes(bytes(raw))

    def drop_tensor(out: Path) -> None:
        path = _folder(out, "sm90") / "checksum.json"
        plan = json.loads(path.read_text())
        for rank, reads in plan["rank_to_reads"].items():
            plan["rank_to_reads"][rank] = [r for r in reads if r["name"] != "model.layers.1.self_attn.o_proj.weight"]
        path.write_text(json.dumps(plan))

    variant("flipped-byte", flip_byte)
    variant("missing-tensor", drop_tensor)
    # A folder converted for TP4, launched as TP2: SGLang's key differs, so the folder is not found.
    jobs.append({"id": "other-tp", "command": tp4.launch_command.replace("--tp-size 4", "--tp-size 2"), "gpu_arch": "sm90"})
    jobs.append({"id": "default-loader", "command": _auto_command(base.resolve(), tp, ep), "gpu_arch": "sm90"})
    no_path = _copy(base, work / "neg-no-path")
    jobs.append({"id": "no-presharded-path", "gpu_arch": "sm90",
                 "command": _auto_command(no_path.resolve(), tp, ep) + " --load-format presharded"})
    jobs.append({"id": "sm90-folder-on-sm100", "command": ok.launch_command, "gpu_arch": "sm100"})
    return run_ranks(tp, jobs, work / "jobs-negatives")


# Each wrong use, and what SGLang's own loader says on every rank.
NEGATIVE = {
    "flipped-byte": "checksum mismatch",
    "missing-tensor": "Missing keys",
    "other-tp": "Cannot find any model weights",
    "default-loader": "Cannot find any model weights",
    "no-presharded-path": "Cannot find any model weights",
    "sm90-folder-on-sm100": "shape mismatch",
}


def test_negative_control_loads(negatives):
    assert all(r.ok and not r.dumped for r in negatives["control"]), [r.error for r in negatives["control"]]


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_wrong_use_fails_loudly(negatives, case):
    for rank, r in enumerate(negatives[case]):
        assert not r.ok, f"{case}: rank {rank} loaded"
        assert NEGATIVE[case] in (r.error or ""), f"{case}: rank {rank}: {r.error}"


# -- BF16 sources ---------------------------------------------------------------------------------


def standard_fp8_checkpoint(bf16: Path, out: Path) -> Path:
    """The BF16 source with its experts block-quantised (mm-convert's rule, FlashInfer's bit for bit),
    as an ordinary Hugging Face checkpoint SGLang's default loader reads: what a presharded folder
    of the BF16 source must equal."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    with SourceCheckpoint.open(bf16) as src:
        for name in src.tensors:
            t = src.read(name)
            if model.parse_expert_name(name):
                q, scale = quantize_fp8_block(t)
                tensors[name], tensors[name + "_scale_inv"] = q, scale
            else:
                tensors[name] = t
        config = serving_config(src)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_bf16_source(tmp_path_factory, work):
    bf16 = make_synthetic(tmp_path_factory.mktemp("src") / "tiny-bf16", TINY, "bf16", seed=3)
    reference = standard_fp8_checkpoint(bf16, work / "bf16-as-fp8")
    tp, ep = 2, 1
    jobs = [{"id": "auto", "command": _auto_command(reference, tp, ep), "gpu_arch": "sm100"}]
    for arch in ARCHS:
        r = _convert(bf16, work / "bf16-out", tp, ep, arch)
        jobs.append({"id": f"presharded-{arch}", "command": r.launch_command, "gpu_arch": arch, "forbid_dump": True})
    jobs.append({"id": "auto-sm90", "command": _auto_command(reference, tp, ep), "gpu_arch": "sm90"})
    results = run_ranks(tp, jobs, work / "jobs-bf16")
    for arch, ref_id in (("sm100", "auto"), ("sm90", "auto-sm90")):
        for rank in range(tp):
            ref, got = results[ref_id][rank], results[f"presharded-{arch}"][rank]
            assert ref.ok and got.ok and not got.dumped, (ref.error, got.error)
            assert differences(ref.state(), got.state()) == [], f"{arch} rank {rank}"


# -- MiniMax-M2.5's real shapes ----------------------------------------------------------------------


def test_real_shape_tp8(tmp_path_factory, work):
    """One layer at MiniMax-M2.5's real shapes (48 heads of 128, 8 KV heads, hidden 3072, intermediate
    1536): TP8 gives each rank 6 query heads and 1 KV head, pads 192 expert rows to 256 and leaves
    MoE-TP ranks 6 and 7 all zero, as in production."""
    spec = dataclasses.replace(REAL_LAYER, num_layers=1, num_experts=8, top_k=2, vocab_size=512)
    src = make_synthetic(tmp_path_factory.mktemp("src") / "real-shape", spec, "fp8", seed=1)
    tp = 8
    jobs = []
    for arch in ARCHS:
        r = _convert(src, work / "real-out", tp, 1, arch)
        jobs.append({"id": f"auto-{arch}", "command": _auto_command(src, tp, 1), "gpu_arch": arch})
        jobs.append({"id": f"presharded-{arch}", "command": r.launch_command, "gpu_arch": arch, "forbid_dump": True})
    results = run_ranks(tp, jobs, work / "jobs-real", timeout=900)
    for arch in ARCHS:
        for rank in range(tp):
            ref, got = results[f"auto-{arch}"][rank], results[f"presharded-{arch}"][rank]
            assert ref.ok and got.ok and not got.dumped, (ref.error, got.error)
            assert differences(ref.state(), got.state()) == [], f"{arch} rank {rank}"
