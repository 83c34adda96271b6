"""The command line as scripts use it: exit codes, one-line errors, nothing written on refusal."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO


def test_make_tiny_is_small_complete_and_deterministic(cli, tmp_path):
    for name in ("a", "b"):
        r = cli("make-tiny", tmp_path / name, "--dtype", "fp8", "--seed", "7")
        assert r.returncode == 0, r.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(p.name for p in a.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(p.stat().st_size for p in a.iterdir()) < 50e6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    weight_map = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    w = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert weight_map[w] != weight_map[w + "_scale_inv"]  # a scale in another shard than its weight
    for needed in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                   "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight_scale_inv",
                   "model.layers.2.self_attn.k_norm.weight", "model.layers.2.input_layernorm.weight",
                   "model.layers.2.post_attention_layernorm.weight", "model.layers.2.block_sparse_moe.gate.weight",
                   "model.layers.2.block_sparse_moe.e_score_correction_bias",
                   "model.layers.2.block_sparse_moe.experts.11.w2.weight_scale_inv"):
        assert needed in weight_map, needed
    assert cli("make-tiny", tmp_path / "c", "--seed", "8").returncode == 0
    shard = "model-00001-of-00004.safetensors"
    assert (tmp_path / "c" / shard).read_bytes() != (a / shard).read_bytes()  # the seed matters
    assert cli("make-tiny", a).returncode != 0  # not empty: refused


@pytest.mark.parametrize(
    "args,reason",
    [
        (["--tp", "8", "--ep", "8"], "does not divide the 12 experts"),
        (["--tp", "4", "--ep", "3"], "must divide tp"),
        (["--tp", "17"], "between 1 and 16"),
        (["--tp", "0"], "between 1 and 16"),
        (["--profile", "vllm"], "unknown profile"),
        (["--part-size", "lots"], "as a size"),
    ],
)
def test_invalid_requests_refused_up_front(cli, tiny_fp8, tmp_path, args, reason):
    out = tmp_path / "out"
    r = cli("convert", tiny_fp8, out, *args, "-q")
    assert r.returncode != 0
    assert reason in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_convert_and_inspect(cli, tiny_bf16, tmp_path):
    out = tmp_path / "out"
    r = cli("convert", tiny_bf16, out, "--profile", "trtllm", "--tp", "4", "--ep", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet: no progress bar
    r = cli("inspect", out)
    assert r.returncode == 0, r.stderr
    lines = [" ".join(line.split()) for line in r.stdout.splitlines()]
    for text in ("profile trtllm", "shape TP4 EP4 moe_tp 1", "w13_weight F8_E4M3 [3, 2, 768, 128]",
                 "manifest complete", "source experts were BF16"):
        assert any(line.startswith(text) for line in lines), text
    r = cli("inspect", tiny_bf16)
    lines = [" ".join(line.split()) for line in r.stdout.splitlines()]
    assert any(line.startswith("routed experts BF16") for line in lines)
    assert any(line.startswith("TP8 EP8 not possible") for line in lines)


def test_progress_bar_shows_bytes_and_rate(cli, tiny_fp8, tmp_path):
    r = cli("convert", tiny_fp8, tmp_path / "out", "--tp", "2")
    assert r.returncode == 0
    assert "B/s" in r.stderr and "100%" in r.stderr


def test_convert_with_recipe_and_override(cli, tmp_path):
    r = cli("convert", "--recipe", REPO / "recipes" / "tiny.toml", "--tp", "2", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "mm-convert-work/tiny/out/config.json").read_text())
    assert (config["mm_convert"]["tp"], config["mm_convert"]["profile"]) == (2, "sglang")


def test_missing_source_is_one_line(cli, tmp_path):
    r = cli("convert", tmp_path / "nope", tmp_path / "out")
    assert r.returncode != 0 and "not a directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_thread_count_changes_no_byte_and_is_given_back(tiny_bf16, tmp_path):
    """--threads is a speed setting only: 1 and 3 torch threads give the same files, and the
    process-wide thread count is the caller's again afterwards."""
    import torch

    from mm_convert.commands.convert import ConvertOptions, convert, default_torch_threads

    assert [default_torch_threads(c) for c in (1, 2, 3, 16)] == [1, 1, 1, 8]
    before = torch.get_num_threads()
    outputs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}"
        convert(tiny_bf16, out, ConvertOptions(profile="trtllm", tp=4, quiet=True, torch_threads=threads))
        assert torch.get_num_threads() == before
        outputs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*.safetensors")})
    assert outputs[0] == outputs[1] and outputs[0]


def test_threads_option_is_checked(cli, tiny_fp8, tmp_path):
    assert cli("convert", tiny_fp8, tmp_path / "a", "--threads", "1", "-q").returncode == 0
    r = cli("convert", tiny_fp8, tmp_path / "b", "--threads", "0", "-q")
    assert r.returncode != 0 and "--threads" in r.stderr and not (tmp_path / "b").exists()


def _tensor_files(out):
    return {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*")
            if p.is_file() and p.name.endswith((".safetensors", ".safetensor")) and ".mm-convert" not in p.parts}


@pytest.mark.parametrize("fmt", ["experts", "presharded"])
def test_dry_run_writes_nothing_and_its_plan_matches_the_conversion(cli, tiny_fp8, tmp_path, fmt):
    out = tmp_path / "out"
    args = ("convert", tiny_fp8, out, "--tp", "4", "--format", fmt, "-q")
    r = cli(*args, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert not out.exists()  # nothing written, not even the folder
    plan = json.loads(r.stdout)
    assert plan["format"] == fmt and len(plan["rank_bytes"]) == 4
    assert plan["needed_bytes"] == plan["total_bytes"] == sum(f["bytes"] for f in plan["files"])
    assert plan["fits"] is True and plan["free_bytes"] > 0
    text = cli(*args, "--dry-run")
    assert text.returncode == 0 and "nothing was written" in text.stdout and not out.exists()

    assert cli(*args).returncode == 0
    written = _tensor_files(out)
    planned = {f["path"]: f["bytes"] for f in plan["files"]}
    if fmt == "experts":
        assert planned == written  # exact: every file, every byte
    else:
        # Presharded stores equal tensors once, found by hashing: the plan is an upper bound.
        assert set(written) <= set(planned)
        assert 0.99 * sum(planned.values()) <= sum(written.values()) <= sum(planned.values())
        assert "--load-format presharded" in plan["launch_command"]
        assert plan["launch_command"] in text.stdout
    again = json.loads(cli(*args, "--dry-run", "--json").stdout)
    assert again["needed_bytes"] == 0 and again["present_bytes"] >= sum(written.values())  # a rerun writes nothing


def test_json_output_of_inspect_and_validate_parses(cli, tiny_fp8, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", tiny_fp8, out, "--tp", "2", "-q").returncode == 0
    for args in (("inspect", out), ("inspect", tiny_fp8), ("validate", out, "--source", tiny_fp8, "--checks", "structure,exact")):
        r = cli(*args, "--json")
        assert r.returncode == 0, (args, r.stderr)
        json.loads(r.stdout)  # the whole stdout is one JSON document
    report = json.loads(cli("validate", out, "--checks", "structure", "--json").stdout)
    assert report["passed"] is True and report["findings"], report


COMMANDS = ("make-tiny", "convert", "validate", "inspect", "download", "publish", "run")


@pytest.mark.parametrize("command", ("",) + COMMANDS)
def test_dash_h_is_help(cli, command):
    r = cli(*([command] if command else []), "-h")
    assert r.returncode == 0 and "Usage: mm-convert" in r.stdout, r.stderr
    assert r.stdout == cli(*([command] if command else []), "--help").stdout


def test_version_is_the_installed_one(cli):
    import importlib.metadata

    import mm_convert

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mm-convert {importlib.metadata.version('mm-convert')}"
    assert mm_convert.__version__ == importlib.metadata.version("mm-convert")


def test_shell_completion_completes_commands_and_options(tmp_path):
    import os
    import subprocess
    import sys

    def complete(words: str) -> list[str]:
        env = {**os.environ, "_MM_CONVERT_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        r = subprocess.run([sys.executable, "-m", "mm_convert.cli"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, (words, r.stdout, r.stderr)
        return r.stdout.split()

    commands = complete("mm-convert con")
    assert "convert" in commands and "validate" not in commands, commands
    options = complete("mm-convert convert --dr")
    assert "--dry-run" in options, options


def test_verbose_says_what_it_decides_on_stderr_only(cli, tiny_fp8, tmp_path):
    loud = cli("-v", "convert", tiny_fp8, tmp_path / "b", "--tp", "2", "-q", "--json")
    assert loud.returncode == 0, loud.stderr
    assert "mm-convert: plan: presharded TP2 for sm100" in loud.stderr and "free at" in loud.stderr
    assert json.loads(loud.stdout)["out"]  # stdout stays one JSON document
    again = cli("convert", tiny_fp8, tmp_path / "b", "--tp", "2", "-q", "--json")  # no -v: nothing said
    assert again.returncode == 0 and again.stderr == "", again.stderr
    v = cli("-v", "validate", tmp_path / "b", "--checks", "structure")
    assert v.returncode == 0 and "check structure: no failure" in v.stderr, v.stderr


def test_one_set_of_defaults_for_cli_recipe_and_python(tmp_path):
    """The API's defaults, the recipe's and the conversion options' are the request types' own."""
    import dataclasses
    import inspect

    import mm_convert
    from mm_convert.commands.convert import ConvertOptions
    from mm_convert.recipe import ConvertSpec, PublishSpec, ValidateSpec, load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[source]\npath = "x"\n')
    loaded = load_recipe(recipe)
    assert (loaded.convert, loaded.validate, loaded.publish) == (ConvertSpec(), ValidateSpec(), PublishSpec())
    options = ConvertOptions()
    for f in dataclasses.fields(ConvertSpec):
        if hasattr(options, f.name):
            assert getattr(options, f.name) == getattr(ConvertSpec(), f.name), f.name
    assert options.chunk_bytes == ConvertSpec().chunk_size == 256 * 10**6  # decimal, as --help says
    for fn, spec in ((mm_convert.convert, ConvertSpec()), (mm_convert.plan, ConvertSpec()),
                     (mm_convert.validate, ValidateSpec()), (mm_convert.publish, PublishSpec())):
        for name, param in inspect.signature(fn).parameters.items():
            if hasattr(spec, name) and param.default is not inspect.Parameter.empty:
                assert param.default == getattr(spec, name), (fn.__name__, name)


def test_sizes_follow_one_rule():
    from mm_convert.units import human_bytes, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("256MB") == 256 * 10**6
    assert parse_size(human_bytes(5 * 10**9).replace(" ", "")) == 5 * 10**9
    assert human_bytes(256 * 10**6) == "256 MB" and human_bytes(2**30) == "1.07 GB"
