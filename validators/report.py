"""Validation results: one record per finding, a readable table, a JSON report, a manifest summary."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mm_convert import __version__
from mm_convert.units import human_bytes

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
    allow_skip: bool = False  # a check that did not run (a kernel this GPU cannot run) does not fail
    # The distributed kernel check: world size, collective backend, each process's device, ranks,
    # time and peak memory (None: the single-process check).
    distributed: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """The inverse of `to_dict` (a report written by another process)."""
        fields = {k: v for k, v in d.items() if k != "passed"}
        fields["findings"] = [Finding(**f) for f in d.get("findings", [])]
        return cls(**fields)

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    def skipped(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "skip"]

    @property
    def incomplete(self) -> bool:
        """Nothing failed, but something asked for did not run (or nothing ran at all)."""
        ran = any(f.status == "pass" for f in self.findings)
        return not self.failures() and (not ran or (bool(self.skipped()) and not self.allow_skip))

    @property
    def passed(self) -> bool:
        """Every check asked for ran and passed: a skipped check is never a pass unless allowed."""
        return not self.failures() and not self.incomplete

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
        lines = [f"validate {self.out}" + (f" against {self.source}" if self.source else
                                            " (no --source: exactness against the source digests the manifest records)")]
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
            width = max([10] + [len(f.shape or "") + 1 for f in rows])
            lines.append(f"{'shape':<{width}}{'layer':>6}{'rel_l2':>11}{'cosine':>11}{'max_abs':>11}{'in_tol':>8}  status")
            for f in rows:
                m = f.metrics
                lines.append(
                    f"{f.shape or '':<{width}}{f.layer:>6}{m['rel_l2']:>11.2e}{m['cosine']:>11.6f}{m['max_abs']:>11.2e}"
                    f"{m['within_tolerance']:>8.3f}  {f.status}"
                )
        if self.distributed:
            d = self.distributed
            lines.append(f"distributed: {d['world_size']} processes, {d['backend']} all-reduce")
            for p in d["processes"]:
                lines.append(f"  process {p['process']}: {p['device_name']} ({p['device']}), ranks "
                             f"{','.join(map(str, p['ranks'])) or 'none'}, last layer {p['seconds']:.2f} s, "
                             f"peak {human_bytes(p['peak_bytes'])}")
        for f in [f for f in self.findings if f.status in ("skip", "info")][:10]:
            lines.append(f.line())
        failures = self.failures()
        for f in failures[:max_failures]:
            lines.append(f.line())
        if len(failures) > max_failures:
            lines.append(f"... and {len(failures) - max_failures} more failures (all in the JSON report)")
        if self.passed:
            verdict = "PASS" + (f" ({len(self.skipped())} checks skipped, allowed by --allow-skip)" if self.skipped() else "")
        elif failures:
            verdict = f"FAIL ({len(failures)} failing checks)"
        else:
            verdict = (f"INCOMPLETE: {len(self.skipped())} checks did not run (pass --allow-skip to accept that)"
                       if self.skipped() else "INCOMPLETE: no check ran")
        lines.append("RESULT: " + verdict)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self, shape: str | None = None) -> dict[str, Any]:
        """What the manifest and the model card keep for one shape (its findings and the folder-wide
        ones): which checks ran with their counts, what did not run, and the kernel table."""
        mine = [f for f in self.findings if shape is None or f.shape in (None, shape)]
        part = Report(self.out, self.source, self.kernel_requested, self.kernel_used, self.kernel_note, self.layers,
                      self.tokens, self.seed, mine, self.seconds, self.tool_version, self.allow_skip)
        return part._summary()

    def _summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tool_version": self.tool_version,
            "source_checked": self.source is not None,
            "kernel": self.kernel_used,
            "kernel_note": self.kernel_note,
            "layers": self.layers,
            "tokens": self.tokens,
            "incomplete": self.incomplete,
            "allow_skip": self.allow_skip,
            "not_run": [f.line() for f in self.skipped()],
            "checks": {k: {s: n for s, n in v.items() if s != "skip"} for k, v in self.by_check().items()
                       if v.get("pass") or v.get("fail")},
            # BF16 sources: the expert weights' quantisation error, per layer (for the card's table and chart)
            "quant_error": next((f.metrics for f in self.findings if f.check == "quant-error" and "per_layer" in f.metrics),
                                None),
            "kernel_rows": [
                {"shape": f.shape, "layer": f.layer, "status": f.status, **f.metrics} for f in self.kernel_rows()
            ],
        }
