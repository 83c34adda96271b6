"""Recipes parse, refuse typos, and command-line flags override them."""

from __future__ import annotations


import pytest

from mm_convert.errors import RequestError
from mm_convert.recipe import load_recipe, override, parse_size
from tests.conftest import REPO


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.convert.profile in ("sglang", "trtllm")
    if r.source.repo_id:
        assert r.source.repo_id == "MiniMaxAI/MiniMax-M2.5"
        assert r.source.revision and len(r.source.revision) == 40  # pinned to a commit


def test_shapes_of_the_real_recipes():
    shapes = {load_recipe(REPO / f"recipes/minimax-m2.5-{n}.toml").convert for n in ("tp4", "tep4", "tp8-ep8")}
    assert {(c.tp, c.ep) for c in shapes} == {(4, 1), (4, 4), (8, 8)}


def test_unknown_key_refused(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[source]\npath = "x"\n[convert]\ntpp = 4\n')
    with pytest.raises(RequestError, match="unknown key.*tpp"):
        load_recipe(p)


def test_exactly_one_source(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[source]\npath = "x"\nrepo_id = "a/b"\n')
    with pytest.raises(RequestError, match="exactly one"):
        load_recipe(p)


def test_override_keeps_unset_values(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[source]\npath = "x"\n[convert]\ntp = 4\nep = 2\npart_size = "500MB"\n')
    spec = load_recipe(p).convert
    assert spec.part_size == 500_000_000
    merged = override(spec, tp=8, ep=None, profile=None)
    assert (merged.tp, merged.ep, merged.part_size) == (8, 2, 500_000_000)


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1024", 1024), (4096, 4096), ("1.5 MB", 1_500_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value
