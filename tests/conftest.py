"""Shared fixtures: small synthetic sources (made once per session) and a CLI runner."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mm_convert.read.tiny import TINY, make_synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("src") / "tiny-fp8", TINY, "fp8", seed=0)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("src") / "tiny-bf16", TINY, "bf16", seed=0)


@pytest.fixture
def tiny_copy(tiny_fp8, tmp_path) -> Path:
    """A private copy of the FP8 tiny source that a test may damage."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_fp8, dst)
    return dst


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> Run:
    """Run `mm-convert` exactly as a user would, in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "mm_convert.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli
