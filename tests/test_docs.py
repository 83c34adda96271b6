"""The README's quick start is what CI runs; the docs the guide asks for exist."""

from __future__ import annotations

import re

from tests.conftest import REPO


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_is_exactly_two_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "recipes/tiny.toml" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert _quick_start_commands()[1] in ci.splitlines()


def test_docs_exist():
    for name in ("DESIGN.md", "VERIFIED.md", "VALIDATION.md", "KERNEL.md", "PERF.md", "RELIABILITY.md",
                 "SGLANG_PARITY.md", "HUBSERVER.md"):
        assert (REPO / "docs" / name).stat().st_size > 1000
