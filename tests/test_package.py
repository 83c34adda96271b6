"""The installed package: one namespaced import name beside PyPI's own packages, and the README's
CI snippet as written."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

_OUTER_SITE = Path(sysconfig.get_paths()["purelib"])


def _offline_pip_env() -> dict[str, str]:
    # Everything the install needs is already on this machine: no index, no isolated build env.
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _fresh_venv(path: Path) -> Path:
    """A new venv that sees this one's packages (torch, ...) only after its own, through a .pth path."""
    subprocess.run([sys.executable, "-m", "venv", path], check=True, capture_output=True)
    site = next((path / "lib").glob("python*/site-packages"))
    # The venv's bundled setuptools is older than the build needs (no bdist_wheel); use this one's.
    for old in [*site.glob("setuptools*"), *site.glob("_distutils_hack"), *site.glob("distutils-precedence.pth")]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    (site / "zz_outer.pth").write_text(f"{_OUTER_SITE}\n")
    return site


def _copy_installed(dist_name: str, site: Path) -> None:
    """Install a distribution exactly as pip laid it out here: its RECORD's files and dist-info."""
    dist = importlib.metadata.distribution(dist_name)
    for f in dist.files or ():
        src = Path(dist.locate_file(f))
        if src.is_file() and ".." not in f.parts:
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, site / f)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, REPO],
                   check=True, capture_output=True, env=_offline_pip_env())
    return next(dist.glob("mm_convert-*.whl"))


def test_the_wheel_installs_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        top = {n.split("/")[0] for n in z.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"mm_convert"}, top
    assert {"convert", "validators"}.isdisjoint(top)


def test_the_wheel_installs_beside_pypi_validators_and_both_work(wheel, tmp_path):
    venv = tmp_path / "venv"
    site = _fresh_venv(venv)
    _copy_installed("validators", site)  # PyPI's `validators` (a test dependency), installed first
    before = {p: p.read_bytes() for p in (site / "validators").rglob("*.py")}
    py = venv / "bin" / "python"
    r = subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", wheel], capture_output=True, text=True,
                       env=_offline_pip_env())
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in (site / "validators").rglob("*.py")} == before  # not one file touched
    probe = ("import validators, mm_convert, mm_convert.validators.run;"
             "assert validators.url('https://huggingface.co/MiniMaxAI') is True;"
             "assert validators.url('not a url') is not True;"
             f"assert validators.__file__.startswith({str(site)!r}), validators.__file__;"
             f"assert mm_convert.__file__.startswith({str(site)!r}), mm_convert.__file__;"
             "print(mm_convert.__version__)")
    r = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == importlib.metadata.version("mm-convert")
    r = subprocess.run([venv / "bin" / "mm-convert", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"mm-convert {importlib.metadata.version('mm-convert')}", r


def _readme_ci_step() -> str:
    readme = (REPO / "README.md").read_text()
    steps = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    [run] = [step["run"] for step in steps if "run" in step]
    return run


def test_the_readme_ci_snippet_runs_as_written(tmp_path, tiny_fp8):
    """The snippet in a folder laid out as it says: the repository at ./mm-convert, a source and
    its conversion beside it."""
    work = tmp_path / "job"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (work / "mm-convert" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / "mm-convert" / rel)
    shutil.copytree(tiny_fp8, work / "MiniMax-M2.5")
    assert run_cli("convert", work / "MiniMax-M2.5", work / "MiniMax-M2.5-FP8-TP4", "--tp", "4", "-q").returncode == 0
    venv = tmp_path / "venv"
    _fresh_venv(venv)
    script = f". {venv}/bin/activate\nset -e\n{_readme_ci_step()}"
    r = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, env=_offline_pip_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASS" in r.stdout and (work / "validation.json").is_file()
