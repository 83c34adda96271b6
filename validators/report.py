"""Validation results: one record per finding, a readable table, a JSON report, a manifest summary."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from convert import __version__

Status = Literal["pass", "fail", "skip", "info"]
CHECKS = ("structure", "exact", "quant-error", "kernel")


@dataclass
class Finding:
    """One result of one check. `message` is a single line naming what it is about."""

    check: str
    status: Status
    message: str
    shape: str | None = None  # e.g. "tp4-ep1"
    layer: int | None = None
    expert: int | None = None
    rank: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        where = " ".join(
            f"{k} {v}" for k, v in (("shape", self.shape), ("layer", self.layer), ("expert", self.expert), ("rank", self.rank))
            if v is not None
        )
        return f"[{self.check}] {self.status.upper()}" + (f" {where}:" if where else ":") + f" {self.message}"


@dataclass
class Report:
    out: str
    source: str | None
    kernel_requested: str
    kernel_used: str | None = None
    kernel_note: str = ""
    layers: list[int] = field(default_factory=list)
    tokens: int = 0
    seed: int = 0
    findings: list[Finding] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    tool_version: str = __version__

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    @property
    def passed(self) -> bool:
        return not any(f.status == "fail" for f in self.findings)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "fail"]

    def by_check(self) -> dict[str, Counter]:
        counts: dict[str, Counter] = {}
        for f in self.findings:
            counts.setdefault(f.check, Counter())[f.status] += 1
        return counts

    def kernel_rows(self) -> list[Finding]:
        return [f for f in self.findings if f.check == "kernel" and f.metrics and f.layer is not None]

    def render(self, max_failures: int = 20) -> str:
        lines = [f"validate {self.out}" + (f" against {self.source}" if self.source else " (no --source: exactness not checked)")]
        lines.append(f"{'check':<13}{'pass':>6}{'fail':>6}{'skip':>6}  seconds")
        for check in CHECKS:
            c = self.by_check().get(check)
            if c is None:
                continue
            took = f"{self.seconds[check]:7.2f}" if check in self.seconds else "   (in exact)" if check == "quant-error" else ""
            lines.append(f"{check:<13}{c['pass']:>6}{c['fail']:>6}{c['skip']:>6}  {took}")
        rows = self.kernel_rows()
        if rows:
            lines.append(f"kernel: {self.kernel_used or 'none'}" + (f" ({self.kernel_note})" if self.kernel_note else ""))
            lines.append(f"{'shape':<10}{'layer':>6}{'rel_l2':>11}{'cosine':>11}{'max_abs':>11}{'in_tol':>8}  status")
            for f in rows:
                m = f.metrics
                lines.append(
                    f"{f.shape or '':<10}{f.layer:>6}{m['rel_l2']:>11.2e}{m['cosine']:>11.6f}{m['max_abs']:>11.2e}"
                    f"{m['within_tolerance']:>8.3f}  {f.status}"
                )
        for f in [f for f in self.findings if f.status in ("skip", "info")][:10]:
            lines.append(f.line())
        failures = self.failures()
        for f in failures[:max_failures]:
            lines.append(f.line())
        if len(failures) > max_failures:
            lines.append(f"... and {len(failures) - max_failures} more failures (all in the JSON report)")
        lines.append("RESULT: " + ("PASS" if self.passed else f"FAIL ({len(failures)} failing checks)"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> dict[str, Any]:
        """What the manifest and the model card keep: per-check counts and the kernel table."""
        return {
            "passed": self.passed,
            "tool_version": self.tool_version,
            "source_checked": self.source is not None,
            "kernel": self.kernel_used,
            "kernel_note": self.kernel_note,
            "layers": self.layers,
            "tokens": self.tokens,
            "checks": {k: dict(v) for k, v in self.by_check().items()},
            "kernel_rows": [
                {"shape": f.shape, "layer": f.layer, "status": f.status, **f.metrics} for f in self.kernel_rows()
            ],
        }
