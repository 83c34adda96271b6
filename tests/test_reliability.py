"""Crash-safe resume, locking, disk full, and a catalogue of bad and hostile inputs: each refused with
one line naming the file and tensor, a non-zero exit, no final output, and the source untouched."""

from __future__ import annotations

import hashlib
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
from typing import Callable

import pytest

from mm_convert.read.tiny import TINY, make_synthetic
from tests.conftest import REPO, run_cli

FINAL_NAMES = ("config.json", "mm_convert.json", "README.md", "model.safetensors.index.json")


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".mm-convert" not in p.parts}


def final_outputs(out: Path) -> list[str]:
    """Files with a final name: anything outside the work area."""
    if not out.exists():
        return []
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".mm-convert" not in p.parts]


# -- kill -9 at several points, then resume ------------------------------------------------------

MULTI_PART = replace(TINY, num_layers=4)
SLOW_WRAPPER = """
import os, sys, time
from mm_convert.write import workarea as writer
mode = os.environ["MM_TEST_SLOW"]
if mode in ("write", "parts"):
    original = writer.StagedFile.write
    def slow(self, data):
        time.sleep(0.02)
        return original(self, data)
    writer.StagedFile.write = slow
if mode == "commit":
    # The real commit, slowed after each of its renames (only the module's own `os.replace`).
    import types
    def slow_replace(src, dst):
        os.replace(src, dst)
        time.sleep(0.3)
    writer.os = types.SimpleNamespace(**{**vars(os), "replace": slow_replace})
from mm_convert.cli import main
sys.argv = ["mm-convert"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def multi_part_source(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("kill") / "src", MULTI_PART, "bf16", seed=3)


# Both output formats: the experts format in parts of 1 MB; presharded with its own files.
FORMAT_ARGS = {"experts": ["--format", "experts", "--part-size", "1MB"], "presharded": []}
CONVERT_ARGS = ["--tp", "4", "--ep", "2", "-q"]


@pytest.fixture(scope="module")
def clean_runs(multi_part_source, tmp_path_factory) -> dict[str, dict[str, str]]:
    runs = {}
    for fmt, args in FORMAT_ARGS.items():
        out = tmp_path_factory.mktemp("clean") / fmt
        r = run_cli("convert", multi_part_source, out, *CONVERT_ARGS, *args)
        assert r.returncode == 0, r.stderr
        runs[fmt] = tree_digest(out)
    return runs


def _start_slow(src: Path, out: Path, mode: str, fmt: str = "experts") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_WRAPPER, "convert", str(src), str(out), *CONVERT_ARGS, *FORMAT_ARGS[fmt]],
        env={**os.environ, "MM_TEST_SLOW": mode, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the conversion finished before the kill point was reached"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)


def _journal_lines(out: Path) -> int:
    journal = out / ".mm-convert" / "journal.jsonl"
    return len(journal.read_text().splitlines()) if journal.exists() else 0


def _partial_written(out: Path) -> bool:
    return any(p.stat().st_size > 4096 for p in (out / ".mm-convert").rglob("*.partial")) if out.exists() else False


def _committing(out: Path) -> bool:
    """Some staged file has been renamed to its final name (the commit started)."""
    return out.exists() and any(p.name == "experts" or p.name.startswith("presharded-") for p in out.iterdir())


KILL_POINTS = [(fmt, point) for fmt in FORMAT_ARGS for point in ("after-some-parts", "during-a-write", "during-commit")]


@pytest.mark.parametrize("fmt,point", KILL_POINTS)
def test_kill_9_then_rerun_gives_identical_output(multi_part_source, clean_runs, tmp_path, fmt, point):
    source_before = tree_digest(multi_part_source)
    out = tmp_path / "out"
    mode = {"after-some-parts": "parts", "during-a-write": "write", "during-commit": "commit"}[point]
    proc = _start_slow(multi_part_source, out, mode, fmt)
    if point == "after-some-parts":
        _wait_for(lambda: _journal_lines(out) >= 3, proc)
    elif point == "during-a-write":
        _wait_for(lambda: _partial_written(out), proc)
    else:
        _wait_for(lambda: _committing(out), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "mm_convert.json" not in final_outputs(out)  # never mistaken for a finished conversion
    assert not any(Path(p).name == "READY" for p in final_outputs(out))  # nor by SGLang
    if point != "during-commit":
        assert not (out / "config.json").exists()  # nothing outside .mm-convert/ before the commit
    else:
        assert (out / ".mm-convert" / "journal.jsonl").is_file()  # the commit is still recorded as unfinished
    r = run_cli("inspect", out)
    assert r.returncode != 0 or "an unfinished conversion is staged" in r.stdout, r.stdout
    r = run_cli("convert", multi_part_source, out, *CONVERT_ARGS, *FORMAT_ARGS[fmt])
    assert r.returncode == 0, r.stderr
    assert tree_digest(out) == clean_runs[fmt]
    assert tree_digest(multi_part_source) == source_before


def test_rerun_with_another_fingerprint_is_refused(multi_part_source, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow(multi_part_source, out, "parts")
    _wait_for(lambda: _journal_lines(out) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_cli("convert", multi_part_source, out, "--tp", "2", "--ep", "2", *FORMAT_ARGS["experts"], "-q")
    assert r.returncode != 0
    assert "different tp (was 4, now 2)" in r.stderr and "--overwrite" in r.stderr
    r = run_cli("convert", multi_part_source, out, "--tp", "2", "--ep", "2", *FORMAT_ARGS["experts"], "-q", "--overwrite")
    assert r.returncode == 0, r.stderr


def test_second_conversion_into_the_same_folder_is_refused(multi_part_source, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow(multi_part_source, out, "parts")
    try:
        _wait_for(lambda: _journal_lines(out) >= 1, proc)
        r = run_cli("convert", multi_part_source, out, *CONVERT_ARGS, *FORMAT_ARGS["experts"])
        assert r.returncode != 0 and "another conversion is writing into this folder" in r.stderr
    finally:
        proc.kill()
        proc.wait()


# -- disk full and write errors ------------------------------------------------------------------

FSIZE_WRAPPER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from mm_convert.cli import main
sys.argv = ["mm-convert"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("fmt,limit", [("experts", 3_000_000), ("presharded", 1_000_000)])
def test_file_size_limit_fails_cleanly_and_resumes(tiny_fp8, tmp_path, fmt, limit):
    """The limit is below the largest file of each format (presharded files hold one layer each)."""
    source_before = tree_digest(tiny_fp8)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", FSIZE_WRAPPER, str(limit), "convert", str(tiny_fp8), str(out),
                        "--tp", "2", "--format", fmt, "-q"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "write failed" in r.stderr and "file size limit" in r.stderr
    assert final_outputs(out) == []
    assert not list(out.rglob("*.partial"))  # the partial file of the failed write is removed
    r = run_cli("convert", tiny_fp8, out, "--tp", "2", "--format", fmt, "-q")
    assert r.returncode == 0, r.stderr
    assert tree_digest(tiny_fp8) == source_before


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(disk: Path) -> Path:
    """Write a filler file until the disk is full."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_fails_cleanly_and_resumes_after_freeing_space(tiny_fp8, tmp_path):
    """The disk fills up while the conversion writes (the up-front check passed): the run fails
    cleanly, and after space is freed the rerun resumes."""
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("cannot mount a small tmpfs here (not root); the file-size-limit test covers the write path")
    try:
        out = disk / "out"
        proc = subprocess.Popen([sys.executable, "-c", SLOW_WRAPPER, "convert", str(tiny_fp8), str(out), "--tp", "2", "-q"],
                                env={**os.environ, "PYTHONPATH": str(REPO), "MM_TEST_SLOW": "write", "MM_CONVERT_TRACEBACK": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not _partial_written(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        filler = _fill(disk)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert len(stderr.strip().splitlines()) == 1 and "the disk is full" in stderr, stderr
        assert final_outputs(out) == []
        journaled = _journal_lines(out)
        filler.unlink()  # free space
        r = run_cli("convert", tiny_fp8, out, "--tp", "2")
        assert r.returncode == 0, r.stderr
        assert f"{journaled} reused" in r.stdout or journaled == 0
        assert run_cli("validate", out, "--source", tiny_fp8, "--kernel", "reference", "--layers", "0").returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("fmt", ["experts", "presharded"])
def test_too_little_disk_is_refused_before_anything_is_written(tiny_fp8, tmp_path, fmt):
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        out = disk / "out"
        r = run_cli("convert", tiny_fp8, out, "--tp", "2", "--format", fmt, "-q")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "the output needs" in r.stderr and "nothing was written" in r.stderr
        assert not out.exists()  # not even the work area or its lock
        r = run_cli("convert", tiny_fp8, out, "--tp", "2", "--format", fmt, "--dry-run")
        assert r.returncode == 0 and "DOES NOT FIT" in r.stdout and not out.exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- bad and hostile input: a catalogue ----------------------------------------------------------


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), n


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    header, n = _header(path)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-(len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _index(src: Path) -> dict:
    return json.loads((src / "model.safetensors.index.json").read_text())


def _write_index(src: Path, index: dict) -> None:
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _shard_of(src: Path, tensor: str) -> Path:
    return src / _index(src)["weight_map"][tensor]


EXPERT = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
SCALE = EXPERT + "_scale_inv"


def _point_index_at(file_name: str) -> Callable[[Path], None]:
    """A damage that makes the index put `model.norm.weight` in `file_name`."""
    def damage(src: Path) -> None:
        index = _index(src)
        index["weight_map"]["model.norm.weight"] = file_name
        _write_index(src, index)
    return damage


def _symlink_escape(src: Path) -> None:
    (src.parent / "elsewhere.safetensors").write_bytes(b"")
    os.symlink(src.parent / "elsewhere.safetensors", src / "linked.safetensors")
    _point_index_at("linked.safetensors")(src)


def _truncate(src: Path) -> None:
    path = _shard_of(src, EXPERT)
    path.write_bytes(path.read_bytes()[:-1000])


def _header_length_past_end(src: Path) -> None:
    path = _shard_of(src, EXPERT)
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 10) + raw[8:])


def _bad_json(src: Path) -> None:
    path = _shard_of(src, EXPERT)
    raw = bytearray(path.read_bytes())
    raw[8] = ord("x")  # the header's opening brace
    path.write_bytes(bytes(raw))


def _overlap(src: Path) -> None:
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]
    _rewrite_header(_shard_of(src, EXPERT), edit)


def _offset_out_of_range(src: Path) -> None:
    def edit(h):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        begin, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [begin + 10**9, end + 10**9]
    _rewrite_header(_shard_of(src, EXPERT), edit)


def _dtype_shape_mismatch(src: Path) -> None:
    _rewrite_header(_shard_of(src, EXPERT), lambda h: h[EXPERT].update(shape=[384, 512]))


def _duplicate_across_shards(src: Path) -> None:
    # A copy of a shard under another name, listed in the index: every tensor in it is there twice.
    shutil.copyfile(_shard_of(src, "model.norm.weight"), src / "dup.safetensors")
    index = _index(src)
    index["weight_map"]["model.norm.weight"] = "dup.safetensors"
    _write_index(src, index)


def _missing_tensor(src: Path) -> None:
    index = _index(src)
    shard = index["weight_map"].pop(EXPERT)
    _write_index(src, index)
    _drop_from_header(src / shard, EXPERT)


def _missing_scale(src: Path) -> None:
    index = _index(src)
    shard = index["weight_map"].pop(SCALE)
    _write_index(src, index)
    _drop_from_header(src / shard, SCALE)


def _drop_from_header(path: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


def _wrong_scale_shape(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _shard_of(src, SCALE)
    tensors = load_file(str(path))
    tensors[SCALE] = tensors[SCALE][:, :1].contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _config_expert_count(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["num_local_experts"] = 8
    (src / "config.json").write_text(json.dumps(config))


def _config_sizes(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 512
    (src / "config.json").write_text(json.dumps(config))


def _unsupported_dtype(src: Path) -> None:
    _rewrite_header(_shard_of(src, EXPERT), lambda h: h[EXPERT].update(dtype="F4"))


def _fp8_e5m2_experts(src: Path) -> None:
    for shard in {_shard_of(src, k) for k in _index(src)["weight_map"] if ".experts." in k and k.endswith(".weight")}:
        def edit(h):
            for k, v in h.items():
                if k != "__metadata__" and ".experts." in k and k.endswith(".weight"):
                    v["dtype"] = "F8_E5M2"
        _rewrite_header(shard, edit)


def _poke_tensor(src: Path, name: str, value: bytes, at: int = 1000) -> None:
    path = _shard_of(src, name)
    header, n = _header(path)
    start = 8 + n + header[name]["data_offsets"][0] + at
    raw = bytearray(path.read_bytes())
    raw[start : start + len(value)] = value
    path.write_bytes(bytes(raw))


def _nan_weight(src: Path) -> None:
    _poke_tensor(src, EXPERT, b"\x7f")  # an e4m3fn NaN


def _nan_scale(src: Path) -> None:
    _poke_tensor(src, SCALE, struct.pack("<f", float("nan")), at=4)


def _inf_scale(src: Path) -> None:
    _poke_tensor(src, SCALE, struct.pack("<f", float("inf")), at=0)


def _zero_scale(src: Path) -> None:
    _poke_tensor(src, SCALE, struct.pack("<f", 0.0), at=8)


def _negative_scale(src: Path) -> None:
    _poke_tensor(src, SCALE, struct.pack("<f", -0.5), at=0)


def _huge_scale(src: Path) -> None:
    _poke_tensor(src, SCALE, struct.pack("<f", 3e38), at=4)  # finite, but 448 x 3e38 overflows float32


def _quant_config(**change) -> Callable[[Path], None]:
    """A damage that edits (or, with a None value, removes) fields of the source's quantization_config."""
    def damage(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        for key, value in change.items():
            if key == "quantization_config" and value is None:
                config.pop(key)
            elif value is None:
                config["quantization_config"].pop(key)
            else:
                config["quantization_config"][key] = value
        (src / "config.json").write_text(json.dumps(config))
    return damage


def _replace_with_fifo(name: str) -> Callable[[Path], None]:
    def damage(src: Path) -> None:
        target = src / name if name != "<shard>" else _shard_of(src, EXPERT)
        target.unlink()
        os.mkfifo(target)
    return damage


def _shard_is_directory(src: Path) -> None:
    target = _shard_of(src, EXPERT)
    target.unlink()
    target.mkdir()


def _config_is_dev_zero(src: Path) -> None:
    (src / "config.json").unlink()
    os.symlink("/dev/zero", src / "config.json")


def _add_tensor(name: str) -> Callable[[Path], None]:
    """A damage that adds a small extra tensor called `name` to the last shard (and the index)."""
    def damage(src: Path) -> None:
        from safetensors.torch import load_file, save_file
        import torch

        index = _index(src)
        shard = sorted(set(index["weight_map"].values()))[-1]
        tensors = load_file(str(src / shard))
        tensors[name] = torch.zeros(4, dtype=torch.bfloat16)
        save_file(tensors, str(src / shard), metadata={"format": "pt"})
        index["weight_map"][name] = shard
        _write_index(src, index)
    return damage


def _pickle_only(src: Path) -> None:
    for p in list(src.glob("*.safetensors")) + [src / "model.safetensors.index.json"]:
        p.unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


CASES = {
    # name: (damage, words the one-line message must contain)
    "index-escapes-with-dotdot": (_point_index_at("../outside.safetensors"), ["model.safetensors.index.json", "not a path inside"]),
    "index-absolute-path": (_point_index_at("/etc/passwd"), ["/etc/passwd", "not a path inside"]),
    "index-symlink-escapes": (_symlink_escape, ["linked.safetensors", "resolves outside"]),
    "index-names-missing-file": (_point_index_at("model-00009-of-00009.safetensors"), ["model-00009-of-00009.safetensors", "missing"]),
    "truncated-shard": (_truncate, [".safetensors", "truncated"]),
    "header-length-past-end": (_header_length_past_end, [".safetensors", "runs past the end of the file"]),
    "header-bad-json": (_bad_json, [".safetensors", "not valid JSON"]),
    "overlapping-offsets": (_overlap, [".safetensors", "overlaps tensor"]),
    "offsets-out-of-range": (_offset_out_of_range, [".safetensors", "past the end of the file"]),
    "dtype-shape-disagree-with-bytes": (_dtype_shape_mismatch, [EXPERT, "need", "bytes but its offsets span"]),
    "duplicate-across-shards": (_duplicate_across_shards, ["dup.safetensors", "also appears in"]),
    "missing-tensor": (_missing_tensor, [EXPERT]),
    "missing-scale": (_missing_scale, [SCALE, "missing tensor"]),
    "wrong-scale-shape": (_wrong_scale_shape, [SCALE, "expected F32 [3, 2]"]),
    "config-expert-count": (_config_expert_count, ["outside the config", "num_local_experts=8"]),
    "config-sizes": (_config_sizes, ["the config implies", "384"]),
    "unsupported-dtype": (_unsupported_dtype, [EXPERT, "unsupported dtype 'F4'"]),
    "unsupported-expert-dtype": (_fp8_e5m2_experts, ["unsupported dtype F8_E5M2"]),
    "nan-in-weight": (_nan_weight, [EXPERT, "FP8 weight holds NaN"]),
    "nan-in-scale": (_nan_scale, [SCALE, "non-finite, non-positive or overflowing"]),
    "inf-in-scale": (_inf_scale, [SCALE, "non-finite, non-positive or overflowing"]),
    "zero-scale": (_zero_scale, [SCALE, "non-finite, non-positive or overflowing"]),
    "negative-scale": (_negative_scale, [SCALE, "non-finite, non-positive or overflowing"]),
    "scale-overflows-the-kernel": (_huge_scale, [SCALE, "overflowing", "7.6e+35"]),
    # quantization_config must describe the tensors (SGLang builds the model from it)
    "quant-config-block-64": (_quant_config(weight_block_size=[64, 64]), ["config.json", "weight_block_size = [64, 64]"]),
    "quant-config-block-1x128": (_quant_config(weight_block_size=[1, 128]), ["config.json", "weight_block_size = [1, 128]"]),
    "quant-config-e5m2": (_quant_config(fmt="float8_e5m2"), ["config.json", "fmt = 'float8_e5m2'"]),
    "quant-config-static": (_quant_config(activation_scheme="static"), ["config.json", "activation_scheme = 'static'"]),
    "quant-config-missing": (_quant_config(quantization_config=None), ["config.json", "no quantization_config"]),
    # files that are not regular files: never read (a FIFO would hang, /dev/zero never ends)
    "config-is-a-fifo": (_replace_with_fifo("config.json"), ["config.json", "a FIFO, not a regular file"]),
    "index-is-a-fifo": (_replace_with_fifo("model.safetensors.index.json"), ["index.json", "a FIFO, not a regular file"]),
    "config-links-to-dev-zero": (_config_is_dev_zero, ["config.json", "a character device"]),
    "shard-is-a-fifo": (_replace_with_fifo("<shard>"), [".safetensors", "a FIFO, not a regular file"]),
    "shard-is-a-directory": (_shard_is_directory, [".safetensors", "a directory, not a regular file"]),
    # every source tensor is converted, copied or refused by name: none vanishes
    "layer-number-with-leading-zero": (_add_tensor("model.layers.01.block_sparse_moe.experts.3.w1.weight"),
                                       ["model.layers.01.block_sparse_moe.experts.3.w1.weight", "no parameter for it"]),
    "unknown-tensor": (_add_tensor("model.layers.0.self_attn.extra.weight"), ["extra.weight", "no parameter for it"]),
    "source-named-like-output": (_add_tensor("model.layers.0.block_sparse_moe.experts.w13_weight"),
                                 ["experts.w13_weight", "named like a converted expert tensor"]),
    "pickle-checkpoint": (_pickle_only, ["pytorch_model.bin", "never loaded", "safetensors source"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_refused(tiny_copy, tmp_path, case):
    damage, words = CASES[case]
    damage(tiny_copy)
    before = tree_digest(tiny_copy)
    out = tmp_path / "out"
    r = run_cli("convert", tiny_copy, out, "--tp", "2", "-q")
    assert r.returncode != 0, r.stdout
    message = r.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith("mm-convert: error: ")
    for word in words:
        assert word in message, (word, message)
    assert final_outputs(out) == []
    assert tree_digest(tiny_copy) == before  # the source is never modified


def test_nan_in_bf16_weight_refused(tiny_bf16, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_bf16, src)
    name = "model.layers.2.block_sparse_moe.experts.7.w2.weight"
    _poke_tensor(src, name, struct.pack("<H", 0x7FC0))  # a bf16 NaN
    r = run_cli("convert", src, tmp_path / "out", "--tp", "2", "-q")
    assert r.returncode != 0 and name in r.stderr and "NaN or Inf" in r.stderr
    assert final_outputs(tmp_path / "out") == []


def test_remote_code_is_copied_never_run(tiny_copy, tmp_path):
    marker = tmp_path / "imported"
    (tiny_copy / "modeling_minimax_m2.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    out = tmp_path / "out"
    assert run_cli("convert", tiny_copy, out, "--tp", "2", "-q").returncode == 0
    assert run_cli("inspect", out).returncode == 0
    assert run_cli("validate", out, "--kernel", "reference", "--layers", "0").returncode == 0
    assert not marker.exists()
    assert (out / "modeling_minimax_m2.py").read_bytes() == (tiny_copy / "modeling_minimax_m2.py").read_bytes()


def test_output_inside_source_or_equal_refused(tiny_copy):
    r = run_cli("convert", tiny_copy, tiny_copy, "--tp", "2", "-q")
    assert r.returncode != 0 and "is the source folder" in r.stderr


def test_non_empty_foreign_output_refused(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run_cli("convert", tiny_fp8, out, "--tp", "2", "-q")
    assert r.returncode != 0 and "not empty and holds no mm-convert output" in r.stderr
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("fmt", sorted(FORMAT_ARGS))
def test_resume_rehashes_staged_files(multi_part_source, clean_runs, tmp_path, fmt):
    """A staged file damaged after the crash is redone, not trusted because the journal lists it."""
    out = tmp_path / "out"
    proc = _start_slow(multi_part_source, out, "parts", fmt)
    _wait_for(lambda: _journal_lines(out) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    journal = [json.loads(line) for line in (out / ".mm-convert" / "journal.jsonl").read_text().splitlines()]
    victim = out / ".mm-convert" / "staging" / journal[0]["path"]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    r = run_cli("convert", multi_part_source, out, *CONVERT_ARGS, *FORMAT_ARGS[fmt])
    assert r.returncode == 0, r.stderr
    assert tree_digest(out) == clean_runs[fmt]
