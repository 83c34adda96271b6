"""`mm-convert validate`: run every check and collect one report."""

from __future__ import annotations
import logging
import time
from contextlib import contextmanager
from pathlib import Path
import torch
from mm_convert.errors import CheckFailed, MMConvertError, RequestError
from mm_convert.read.source import SourceCheckpoint
from mm_convert.validators import exact, kernel_check, structure
from mm_convert.validators.checkpoint import ConvertedCheckpoint
from mm_convert.recipe import KERNEL_CHOICES
from mm_convert.validators.kernels.select import select
from mm_convert.validators.report import Finding, Report


def parse_layers(text: str | None) -> list[int] | None:
    """`0,30,61` -> [0, 30, 61]; `all` -> every layer (-1 marks it); None -> the default spread."""
    if text is None:
        return None
    if text.strip() == "all":
        return [-1]
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise RequestError(f"--layers {text!r}: give layer numbers separated by commas, or all") from None


@contextmanager
def _timed(report: Report, check: str):
    """Time a check; a damaged folder that stops it is that check's failure, not a crash."""
    started = time.monotonic()
    try:
        yield
    except MMConvertError as exc:
        report.add(Finding(check, "fail", f"stopped: {exc}"))
    finally:
        report.seconds[check] = report.seconds.get(check, 0.0) + time.monotonic() - started
        failed = sum(1 for f in report.findings if f.check == check and f.status == "fail")
        log.info("check %s: %s in %.1f s", check, f"{failed} failure(s)" if failed else "no failure", report.seconds[check])


ALL_CHECKS = ("structure", "exact", "kernel")
log = logging.getLogger(__name__)


def validate(out: str | Path, source: str | Path | None = None, kernel: str = "auto", layers: list[int] | None = None,
             tokens: int = 64, seed: int = 0, device: str | None = None,
             checks: tuple[str, ...] | None = None, allow_skip: bool = False) -> Report:
    """Every check on a converted checkpoint (`checks` None: all of them; `exact` needs the source).

    A check asked for that cannot run (`exact` without a source, a kernel this machine cannot run)
    is reported as not run, and the result is not a pass unless `allow_skip`."""
    if checks is None:
        checks = ALL_CHECKS
    unknown = set(checks) - set(ALL_CHECKS)
    if unknown:
        raise CheckFailed(f"--checks: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ALL_CHECKS)})")
    if not checks:
        raise CheckFailed(f"--checks: name at least one of {', '.join(ALL_CHECKS)}")
    if kernel not in KERNEL_CHOICES:
        raise CheckFailed(f"--kernel {kernel!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    if tokens < 1:
        raise CheckFailed(f"--tokens must be at least 1, got {tokens}")
    if not 0 <= seed < 2**31:
        raise CheckFailed(f"--seed must be between 0 and {2**31 - 1}, got {seed}")
    if device not in (None, "cpu", "cuda"):
        raise CheckFailed(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RequestError("--device cuda: no CUDA device is available here")
    with ConvertedCheckpoint.open(out) as ckpt:
        if layers == [-1]:
            chosen = list(range(ckpt.shape.num_layers))
        else:
            chosen = layers if layers is not None else kernel_check.default_layers(ckpt.shape.num_layers)
        outside = [layer for layer in chosen if not 0 <= layer < ckpt.shape.num_layers]
        if outside:
            raise CheckFailed(f"--layers: layer {outside[0]} does not exist (the model has {ckpt.shape.num_layers})")
        report = Report(out=str(out), source=str(source) if source else None, kernel_requested=kernel,
                        layers=chosen, tokens=tokens, seed=seed, allow_skip=allow_skip)
        if "structure" in checks:
            with _timed(report, "structure"):
                structure.run(ckpt, report)
        src = SourceCheckpoint.open(source) if source is not None else None
        try:
            if "exact" in checks:
                with _timed(report, "exact"):
                    if src is None:
                        exact.run_digests(ckpt, report)  # against what the conversion recorded reading
                    else:
                        exact.run(ckpt, src, report)
            if "kernel" not in checks:
                return report
            selection = select(kernel, ckpt.profile.flags, device)
            report.kernel_used = selection.backend.name if selection.backend else None
            report.kernel_note = selection.note
            if selection.backend is None:
                report.add(Finding("kernel", "skip", selection.note))
            else:
                broken = frozenset(f.shape for f in report.failures() if f.check == "structure" and f.shape)
                if any(f.check == "structure" and f.shape is None for f in report.failures()):
                    broken = frozenset(e.key for e in ckpt.block.shapes)  # config-level failure
                with _timed(report, "kernel"):
                    kernel_check.run(ckpt, src, report, selection.backend, chosen, tokens, seed, broken)
        finally:
            if src is not None:
                src.close()
    return report
