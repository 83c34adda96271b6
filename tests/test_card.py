"""The model card: metadata the Hub indexes (parsed by huggingface_hub, held to the Hub's documented
rules in tests/hub_rules.py), the source's licence carried over whole, a deployment section, the
real quantisation error for BF16 sources, and its chart."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests import hub_rules
from tests.conftest import run_cli

UPSTREAM_CARD = """---
license: other
license_name: modified-mit
license_link: https://github.com/MiniMax-AI/MiniMax-M2.5/blob/main/LICENSE
language:
- en
- zh
pipeline_tag: text-generation
library_name: transformers
tags:
- conversational
---

# MiniMax-M2.5
"""


def card(out: Path) -> ModelCard:
    return ModelCard((out / "README.md").read_text())


@pytest.fixture
def upstream_like(tiny_fp8, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    (src / "README.md").write_text(UPSTREAM_CARD)
    return src


@pytest.mark.parametrize("fmt", ["presharded", "experts"])
def test_the_source_licence_is_carried_over_whole(upstream_like, tmp_path, fmt):
    out = tmp_path / "out"
    assert run_cli("convert", upstream_like, out, "--tp", "2", "--format", fmt, "-q").returncode == 0
    meta = card(out).data.to_dict()
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "modified-mit", "https://github.com/MiniMax-AI/MiniMax-M2.5/blob/main/LICENSE")
    assert meta["language"] == ["en", "zh"]
    assert "conversational" in meta["tags"]  # the Hub's chat snippet follows this tag
    assert hub_rules.problems(meta) == []
    text = (out / "README.md").read_text()
    assert "`modified-mit` (https://github.com/MiniMax-AI/MiniMax-M2.5/blob/main/LICENSE)" in text
    assert "## Deployment" in text
    assert (out / "LICENSE").read_bytes() == (upstream_like / "LICENSE").read_bytes()


def test_a_source_without_a_card_is_unknown_not_invented(tiny_copy, tmp_path):
    (tiny_copy / "README.md").unlink()
    out = tmp_path / "out"
    assert run_cli("convert", tiny_copy, out, "--tp", "2", "-q").returncode == 0
    meta = card(out).data.to_dict()
    assert meta["license"] == "unknown" and "license_name" not in meta
    assert hub_rules.problems(meta) == []
    assert "the source states none" in (out / "README.md").read_text()


def test_a_source_card_that_does_not_parse_is_refused(tiny_copy, tmp_path):
    (tiny_copy / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    r = run_cli("convert", tiny_copy, tmp_path / "out", "--tp", "2", "-q")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "README.md" in r.stderr and "cannot be parsed" in r.stderr


def test_the_card_follows_the_hubs_rules_and_shows_the_snippets(upstream_like, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", upstream_like, out, "--tp", "2", "-q").returncode == 0
    meta = card(out).data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"fp8", "sglang", "mm-convert", "presharded"} <= set(meta["tags"])


def test_the_rules_catch_what_the_hub_would_not_take():
    good = {"license": "mit", "library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["fp8"],
            "base_model": "MiniMaxAI/MiniMax-M2.5", "base_model_relation": "quantized"}
    assert hub_rules.problems(good) == []
    for change in ({"license": "see-source-repository"}, {"license": "other"}, {"library_name": "sglang"},
                   {"base_model_relation": "quantised"}, {"base_model": "not a repo"}, {"tags": ["a", "a"]}):
        assert hub_rules.problems({**good, **change}), change


def test_bf16_card_shows_the_real_quantisation_error_per_layer_and_a_chart(tiny_bf16, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", tiny_bf16, out, "--tp", "2", "-q").returncode == 0
    assert not (out / "validation.svg").exists()  # nothing to draw before validation
    r = run_cli("validate", out, "--source", tiny_bf16, "--kernel", "reference", "--record")
    assert r.returncode == 0, r.stdout + r.stderr
    text = (out / "README.md").read_text()
    summary = next(iter(json.loads((out / "mm_convert.json").read_text())["validation"].values()))
    quant = summary["quant_error"]
    assert 0.01 < quant["mean_rel_l2"] < 0.05  # e4m3 with 128x128 blocks on gaussian weights: about 0.0265
    assert [row[0] for row in quant["per_layer"]] == [0, 1, 2]
    for layer, n, mean, worst in quant["per_layer"]:
        assert f"| {layer} | {n} | {mean:.4f} | {worst:.4f} |" in text
    rows = summary["kernel_rows"]
    assert all(r["vs_source_rel_l2"] > 100 * r["rel_l2"] for r in rows)  # quantisation, not layout, dominates
    assert "rel L2 vs BF16" in text and "![Per-layer errors recorded by the validation](validation.svg)" in text
    svg = ET.parse(out / "validation.svg").getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2  # layer output vs BF16, expert weights vs BF16
    assert all(len(pl.get("points").split()) == 3 for pl in lines)  # one point per validated layer
    files = {f["path"] for f in json.loads((out / "mm_convert.json").read_text())["files"]}
    assert "validation.svg" in files
    assert run_cli("validate", out, "--kernel", "reference").returncode == 0  # the chart is a listed, hashed file


def test_fp8_card_has_no_quantisation_table(tiny_fp8, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", tiny_fp8, out, "--tp", "2", "-q").returncode == 0
    assert run_cli("validate", out, "--source", tiny_fp8, "--kernel", "reference", "--record").returncode == 0
    text = (out / "README.md").read_text()
    assert "Quantisation error of the expert weights" not in text and "rel L2 vs BF16" not in text
    svg = ET.parse(out / "validation.svg").getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 1  # kernel vs FP8 reference
