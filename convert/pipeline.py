"""The whole job of a recipe: source -> convert -> validate -> publish (`mm-convert run`)."""

from __future__ import annotations

from pathlib import Path

from convert.errors import ConvertError
from convert.recipe import Recipe
from convert.tiny import TINY, make_synthetic


def tiny_source_dir(recipe: Recipe) -> Path:
    return recipe.work_path / f"source-tiny-{recipe.source.tiny_dtype}-seed{recipe.source.tiny_seed}"


def prepare_source(recipe: Recipe) -> Path:
    """The local source folder a recipe converts, making the built-in tiny model if needed."""
    spec = recipe.source
    if spec.path is not None:
        return Path(spec.path)
    if spec.is_tiny:
        folder = tiny_source_dir(recipe)
        if not (folder / "config.json").is_file():
            make_synthetic(folder, TINY, spec.tiny_dtype or "fp8", spec.tiny_seed)
        return folder
    raise ConvertError(f"{recipe.path}: source {spec.repo_id} is on the Hub; download it first")
