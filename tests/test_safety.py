"""Nothing lost, nothing outside OUT touched, nothing passed that was not checked (docs/RELIABILITY.md).

Each test plants one hostile input or fault from the catalogue and checks the class of defect it
stands for, not just the one spelling.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mm_convert.commands.convert import ConvertOptions, convert
from mm_convert.read.tiny import REAL_LAYER, make_synthetic
from tests import defects
from tests.conftest import REPO, run_cli
from tests.test_reliability import _poke_tensor, tree_digest
from mm_convert.validators.run import validate


def _one_line_error(r) -> str:
    message = r.stderr.strip()
    assert r.returncode != 0 and len(message.splitlines()) == 1 and message.startswith("mm-convert: error: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    return message


@pytest.fixture
def finished(tiny_fp8, tmp_path) -> Path:
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=2, format="experts", quiet=True))
    return out


# -- 1. paths read from files are confined --------------------------------------------------------


@pytest.mark.parametrize("entry", ["../victim", "experts/tp2-ep1/../../../victim", "/{tmp}/victim", "~/victim"])
@pytest.mark.parametrize("how", ["rerun", "overwrite"])
def test_manifest_paths_never_escape_out(tiny_fp8, finished, tmp_path, entry, how):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    manifest = json.loads((finished / "mm_convert.json").read_text())
    manifest["files"].append({"path": entry.format(tmp=str(tmp_path).lstrip("/")), "size": 7, "sha256": "0" * 64})
    (finished / "mm_convert.json").write_text(json.dumps(manifest))
    args = ["--tp", "2", "--format", "experts", "-q"] + (["--tp", "4", "--overwrite"] if how == "overwrite" else [])
    message = _one_line_error(run_cli("convert", tiny_fp8, finished, *args))
    assert "mm_convert.json: files entry" in message and "refused" in message
    assert victim.read_text() == "keep me"


def test_journal_paths_never_escape_out(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    (out / ".mm-convert").mkdir(parents=True)
    (out / ".mm-convert" / "journal.jsonl").write_text(json.dumps({"path": "../../etc/passwd", "size": 1, "sha256": "0"}) + "\n")
    message = _one_line_error(run_cli("convert", tiny_fp8, out, "--tp", "2", "-q"))
    assert "journal.jsonl: entry" in message and "../../etc/passwd" in message


def test_checksum_json_paths_never_escape_the_folder(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=2, quiet=True))
    (folder,) = [p for p in next(out.glob("presharded-*")).iterdir()]
    plan = json.loads((folder / "checksum.json").read_text())
    plan["rank_to_reads"]["0"][0]["filename"] = "../../../../etc/passwd"
    (folder / "checksum.json").write_text(json.dumps(plan))
    defects.forge_manifest(out)
    report = validate(out, None, kernel="reference", layers=[0])
    assert not report.passed and any("leaves the folder" in f.message for f in report.failures())


# -- 2. --overwrite: the lock first, and the old output kept until the new one is complete ----------


def test_refused_overwrite_deletes_nothing(tiny_fp8, finished):
    before = tree_digest(finished)
    (finished / ".mm-convert").mkdir()
    fd = os.open(finished / ".mm-convert" / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another conversion is writing here
    try:
        message = _one_line_error(run_cli("convert", tiny_fp8, finished, "--tp", "4", "--profile", "trtllm", "--overwrite", "-q"))
        assert "lock held" in message
    finally:
        os.close(fd)
    assert tree_digest(finished) == before


def test_overwrite_that_fails_half_way_loses_nothing(tiny_bf16, finished, tmp_path):
    """A BF16 source with a NaN in its last layer fails after most files are written: the old output stays whole."""
    bad = tmp_path / "bad-bf16"
    shutil.copytree(tiny_bf16, bad)
    _poke_tensor(bad, "model.layers.2.block_sparse_moe.experts.11.w2.weight", struct.pack("<H", 0x7FC0))
    before = tree_digest(finished)
    message = _one_line_error(run_cli("convert", bad, finished, "--tp", "2", "--format", "experts", "--overwrite", "-q"))
    assert "NaN" in message
    assert tree_digest(finished) == before
    assert run_cli("validate", finished, "--kernel", "reference", "--layers", "0").returncode == 0


def test_overwrite_swaps_in_the_new_output_at_commit(tiny_fp8, finished):
    r = run_cli("convert", tiny_fp8, finished, "--tp", "4", "--profile", "trtllm", "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    assert not (finished / "experts" / "tp2-ep1").exists()  # the replaced shape's files are gone
    manifest = json.loads((finished / "mm_convert.json").read_text())
    assert manifest["profile"] == "trtllm" and not (finished / ".mm-convert").exists()
    assert run_cli("validate", finished, "--kernel", "reference", "--layers", "0").returncode == 0


# -- 3 and 6. a changed source is never reused, and provenance says what was read -----------------------


@pytest.mark.parametrize("change", ["one-expert-byte", "touched"])
def test_changed_source_is_not_reused(tiny_copy, tmp_path, change):
    out = tmp_path / "out"
    assert run_cli("convert", tiny_copy, out, "--tp", "2", "-q").returncode == 0
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    if change == "one-expert-byte":
        _poke_tensor(tiny_copy, name, b"\x01")
    else:
        shard = tiny_copy / json.loads((tiny_copy / "model.safetensors.index.json").read_text())["weight_map"][name]
        os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))
    message = _one_line_error(run_cli("convert", tiny_copy, out, "--tp", "2", "-q"))
    assert "different source (or the same files changed since)" in message and "--overwrite" in message
    assert run_cli("convert", tiny_copy, out, "--tp", "2", "-q", "--overwrite").returncode == 0


# -- 7. OUT and SRC apart -------------------------------------------------------------------------------


def test_out_inside_source_or_source_inside_out_refused(tiny_fp8, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    before = tree_digest(src)
    assert "inside the source folder" in _one_line_error(run_cli("convert", src, src / "out", "--tp", "2", "-q"))
    assert "holds the source folder" in _one_line_error(run_cli("convert", src, tmp_path, "--tp", "2", "-q"))
    assert tree_digest(src) == before and not (src / "out").exists()


# -- 5. nothing passed that was not checked ------------------------------------------------------------


def test_checks_that_cannot_run_do_not_pass(finished, tmp_path):
    manifest = json.loads((finished / "mm_convert.json").read_text())
    manifest["source_digests"] = {}  # as an older conversion: exactness only with --source
    (finished / "mm_convert.json").write_text(json.dumps(manifest))
    r = run_cli("validate", finished, "--checks", "exact")
    assert r.returncode == 3 and "INCOMPLETE" in r.stdout and "not run" in r.stdout
    assert "name at least one" in _one_line_error(run_cli("validate", finished, "--checks", ""))
    r = run_cli("validate", finished, "--kernel", "trtllm", "--layers", "0", "--checks", "structure,kernel")
    assert r.returncode == 3 and "trtllm skipped" in r.stdout
    r = run_cli("validate", finished, "--kernel", "trtllm", "--layers", "0", "--checks", "structure,kernel", "--allow-skip", "--record")
    assert r.returncode == 0 and "allowed by --allow-skip" in r.stdout
    recorded = json.loads((finished / "mm_convert.json").read_text())["validation"]["tp2-ep1"]
    assert "kernel" not in recorded["checks"] and recorded["not_run"]  # only what ran is recorded as run
    r = run_cli("validate", finished, "--kernel", "trtllm", "--layers", "0", "--checks", "structure,kernel", "--record")
    assert r.returncode == 3
    assert not json.loads((finished / "mm_convert.json").read_text())["validation"]["tp2-ep1"]["passed"]
    assert "validation failed" in _one_line_error(run_cli("publish", finished, "someone/repo"))


# -- 9. edits of the config block and manifest, and value-preserving tampering, without the source ------


def _exact_failures(out: Path) -> list[str]:
    report = validate(out, None, kernel="reference", layers=[0])
    return [f.message for f in report.failures() if f.check == "exact"]


@pytest.fixture
def tp4_ep2(tiny_fp8, tmp_path) -> Path:
    out = tmp_path / "tp4ep2"
    convert(tiny_fp8, out, ConvertOptions(tp=4, ep=2, format="experts", quiet=True))
    return out


def _edit_part(out: Path, rank: int, change) -> None:
    defects.rewrite_tensors(out / f"experts/tp4-ep2/rank-{rank}-part-0.safetensors", change)


def test_two_experts_swapped_caught_without_source(tp4_ep2):
    def swap(t):
        for kind in ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"):
            name = f"model.layers.1.block_sparse_moe.experts.{kind}"
            x = t[name].clone()
            x[[0, 1]] = x[[1, 0]]
            t[name] = x
    _edit_part(tp4_ep2, 0, swap)
    defects.forge_manifest(tp4_ep2)
    failures = _exact_failures(tp4_ep2)
    assert any("do not undo to the bytes the conversion read" in m for m in failures), failures


def test_ep_blocks_swapped_caught_without_source(tp4_ep2):
    folder = tp4_ep2 / "experts/tp4-ep2"
    for a, b in ((0, 2), (1, 3)):  # ranks 0/1 hold experts 0-5, ranks 2/3 experts 6-11
        pa, pb = folder / f"rank-{a}-part-0.safetensors", folder / f"rank-{b}-part-0.safetensors"
        tmp = pa.with_suffix(".tmp")
        pa.rename(tmp), pb.rename(pa), tmp.rename(pb)
    for rank in range(4):  # make the metadata agree again
        from safetensors import safe_open

        path = folder / f"rank-{rank}-part-0.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta.update(rank=str(rank), moe_tp_rank=str(rank % 2), moe_ep_rank=str(rank // 2),
                    local_expert_offset=str(6 * (rank // 2)))
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=meta)
    defects.forge_manifest(tp4_ep2)
    assert any("do not undo" in m for m in _exact_failures(tp4_ep2))


def test_one_scale_doubled_caught_without_source(tp4_ep2):
    def double(t):
        name = "model.layers.0.block_sparse_moe.experts.w2_weight_scale_inv"
        x = t[name].clone()
        x[3, 0, 0] *= 2
        t[name] = x
    _edit_part(tp4_ep2, 1, double)
    defects.forge_manifest(tp4_ep2)
    failures = _exact_failures(tp4_ep2)
    assert any("w2 scales" in m and "do not undo" in m for m in failures), failures


def test_presharded_ranks_swapped_caught_without_source(tiny_fp8, tmp_path):
    """Two ranks' expert tensors exchanged in checksum.json, rank checksums recomputed: self-consistent."""
    from mm_convert.plan import presharded

    out = tmp_path / "p"
    convert(tiny_fp8, out, ConvertOptions(tp=2, ep=2, gpu_arch="sm90", quiet=True))  # no padding: EP blocks only
    (folder,) = list(next(out.glob("presharded-*")).iterdir())
    plan = json.loads((folder / "checksum.json").read_text())
    name = "model.layers.0.block_sparse_moe.experts.w2_weight"
    r0 = next(r for r in plan["rank_to_reads"]["0"] if r["name"] == name)
    r1 = next(r for r in plan["rank_to_reads"]["1"] if r["name"] == name)
    (r0["filename"], r0["stored_key"]), (r1["filename"], r1["stored_key"]) = (r1["filename"], r1["stored_key"]), \
        (r0["filename"], r0["stored_key"])
    for rank, reads in plan["rank_to_reads"].items():
        plan["rank_checksums"][rank] = presharded.rank_checksum((r["name"], r["stored_key"]) for r in reads)
    (folder / "checksum.json").write_text(json.dumps(plan))
    defects.forge_manifest(out)
    report = validate(out, None, kernel="reference", layers=[0])
    assert not [f for f in report.failures() if f.check == "structure"]  # self-consistent, as planned
    assert any("w2 weights" in f.message and "do not undo" in f.message for f in report.failures())


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c["mm_convert"].update(format_version=0), "format_version 0"),
    (lambda c: c["mm_convert"]["shapes"].pop(), "a shape folder on disk that the block does not list"),
])
def test_config_block_edits_caught(tiny_fp8, tmp_path, edit, expect):
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=2, format="experts", quiet=True))
    convert(tiny_fp8, out, ConvertOptions(tp=4, format="experts", quiet=True))
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    defects.forge_manifest(out)
    report = validate(out, None, kernel="reference", layers=[0])
    assert any(expect in f.message for f in report.failures()), report.render()


def test_config_removed_from_manifest_caught(finished):
    manifest = json.loads((finished / "mm_convert.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "config.json"]
    (finished / "mm_convert.json").write_text(json.dumps(manifest))
    config = json.loads((finished / "config.json").read_text())
    config["rope_theta"] = 1
    (finished / "config.json").write_text(json.dumps(config))
    report = validate(finished, None, kernel="reference", layers=[0])
    assert any("config.json: not listed in the manifest" in f.message for f in report.failures())


def test_negative_zero_padding_is_not_zero(finished):
    """SGLang writes +0.0 into padding: -0.0 fails in scales as it does in weights."""
    def poke(t):
        name = "model.layers.0.block_sparse_moe.experts.w13_weight_scale_inv"
        x = t[name].clone()
        x[0, 3, 0] = -0.0  # TP2 of 384 rows: rank 1 holds 128 real rows of its 256, blocks 1 and 3 are padding
        t[name] = x
    defects.rewrite_tensors(finished / "experts/tp2-ep1/rank-1-part-0.safetensors", poke)
    defects.forge_manifest(finished)
    report = validate(finished, None, kernel="reference", layers=[0])
    assert any("padding is not zero" in f.message for f in report.failures() if f.check == "structure")


# -- 4. --source on every shape, the padded MiniMax TP8 included ------------------------------------------


@pytest.mark.parametrize("fmt,tp,ep", [("experts", 8, 1), ("experts", 16, 4), ("presharded", 8, 1), ("presharded", 8, 2),
                                       ("presharded", 4, 1)])
def test_validate_with_source_on_all_padding_ranks(tiny_fp8, tmp_path, fmt, tp, ep):
    out = tmp_path / "out"
    convert(tiny_fp8, out, ConvertOptions(tp=tp, ep=ep, format=fmt, quiet=True))
    report = validate(out, tiny_fp8, kernel="reference", layers=[0])
    assert report.passed, report.render()


@pytest.fixture(scope="module")
def real_tp8_source(tmp_path_factory) -> Path:
    """MiniMax-M2.5's real shapes, one layer of 8 experts: TP8 pads 192 rows to 256, ranks 6 and 7 all zero."""
    spec = replace(REAL_LAYER, num_layers=1, num_experts=8, top_k=2, vocab_size=512, random_fp8_bytes=True)
    return make_synthetic(tmp_path_factory.mktemp("real") / "src", spec, "fp8", seed=1)


@pytest.mark.parametrize("fmt", ["experts", "presharded"])
def test_validate_real_size_tp8_with_source(real_tp8_source, tmp_path, fmt):
    out = tmp_path / "out"
    convert(real_tp8_source, out, ConvertOptions(tp=8, format=fmt, quiet=True))
    report = validate(out, real_tp8_source, kernel="reference", layers=[0], tokens=16)
    assert report.passed, report.render()
    assert validate(out, None, kernel="reference", layers=[0], tokens=16).passed  # and against the digests


# -- 11. every source tensor converted, copied, or refused by name ----------------------------------------


def test_experts_format_copies_unknown_tensors_and_the_census_closes(tiny_copy, tmp_path):
    from tests.test_reliability import _add_tensor

    name = "model.layers.01.block_sparse_moe.experts.3.w1.weight"
    _add_tensor(name)(tiny_copy)
    out = tmp_path / "out"
    assert run_cli("convert", tiny_copy, out, "--tp", "2", "--format", "experts", "-q").returncode == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert name in index  # copied, not dropped
    census = json.loads((out / "mm_convert.json").read_text())["census"]
    assert census["output_other_tensors"] == census["source_other_tensors"]


# -- 12. one line, never a traceback -----------------------------------------------------------------------


BAD_ARGS = [
    ["convert"], ["convert", "{src}"], ["convert", "{src}", "{out}", "--tp", "abc"], ["convert", "{src}", "{out}", "--tp", "0"],
    ["convert", "{src}", "{out}", "--ep", "5", "--tp", "4"], ["convert", "{src}", "{out}", "--device", "cuda"],
    ["convert", "{src}", "{out}", "--device", "tpu"], ["convert", "{src}", "{out}", "--ranks", "x"],
    ["convert", "{src}", "{out}", "--chunk-size", "lots"], ["convert", "{src}", "{out}", "--recipe", "{file}"],
    ["convert", "/nonexistent", "{out}"], ["convert", "{file}", "{out}"],
    ["validate"], ["validate", "/nonexistent"], ["validate", "{src}"], ["validate", "{conv}", "--seed", str(2**64)],
    ["validate", "{conv}", "--report", "/nonexistent/dir/r.json"], ["validate", "{conv}", "--device", "cuda"],
    ["validate", "{conv}", "--layers", "a,b"], ["validate", "{conv}", "--layers", "99"], ["validate", "{conv}", "--tokens", "0"],
    ["validate", "{conv}", "--kernel", "nope"], ["validate", "{conv}", "--checks", "nope"],
    ["inspect", "/nonexistent"], ["inspect", "{file}"],
    ["make-tiny", "{file}"], ["make-tiny", "{out}", "--dtype", "int4"],
    ["download", "a/b", "{file}"], ["download", "not a repo", "{out}"], ["download", "a/b", "{out}", "--revision", "../evil"],
    ["publish", "{src}", "a/b"], ["publish", "{conv}", "not a repo"],
    ["run", "{file}"], ["run", "{recipe_list}"], ["run", "{recipe_int}"], ["run", "/nonexistent.toml"],
    ["frobnicate"], ["convert", "--no-such-flag"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a)[:60])
def test_every_command_with_bad_arguments_fails_in_one_line(tiny_fp8, finished, tmp_path, args):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "list.toml").write_text('[[source]]\npath = "x"\n')
    (tmp_path / "int.toml").write_text('convert = 5\n[source]\npath = "x"\n')
    values = {"src": tiny_fp8, "out": tmp_path / "new-out", "file": tmp_path / "a-file", "conv": finished,
              "recipe_list": tmp_path / "list.toml", "recipe_int": tmp_path / "int.toml"}
    r = run_cli(*[a.format(**values) for a in args], env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    _one_line_error(r)


def test_ctrl_c_is_one_line_and_resumable(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    # From the third write on, the conversion waits (mid-file) for the Ctrl-C, so it always lands
    # during the work, however fast the machine; the handler then does what Python's default does.
    slow = ("import signal, sys, threading; from mm_convert.write import workarea as writer\n"
            "w, calls, interrupted = writer.StagedFile.write, [0], threading.Event()\n"
            "def on_int(s, f):\n    interrupted.set(); signal.default_int_handler(s, f)\n"
            "signal.signal(signal.SIGINT, on_int)\n"
            "def slow(self, d):\n    calls[0] += 1\n    calls[0] >= 3 and interrupted.wait(60)\n    return w(self, d)\n"
            "writer.StagedFile.write = slow\nfrom mm_convert.cli import main\nmain(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, "convert", str(tiny_fp8), str(out), "--tp", "2", "-q"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not list(out.rglob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines() == ["mm-convert: error: interrupted; finished files are kept and a rerun resumes"]
    assert run_cli("convert", tiny_fp8, out, "--tp", "2", "-q").returncode == 0


def test_scales_and_weights_agree_on_torch_zero():
    """A guard for the -0.0 test above: -0.0 == 0.0 as values, so only a bitwise check can see it."""
    x = torch.tensor([-0.0])
    assert bool(x == 0) and int(x.view(torch.int32)) != 0
