"""The Python API: the six commands as functions, with the command line's defaults.

    import mm_convert

    snapshot = mm_convert.download("MiniMaxAI/MiniMax-M2.5", revision="<commit>").folder
    result = mm_convert.convert(snapshot, "out", tp=4)
    print(result.launch_command)
    report = mm_convert.validate("out", source=snapshot, kernel="reference")
    if not report.passed:
        ...

Every default comes from `ConvertSpec`, `ValidateSpec` and `PublishSpec` (mm_convert.recipe), the
same ones recipes and the `mm-convert` flags use. Every failure is an `MMConvertError` subclass
(`SourceError`, `RequestError`, `OutputError`, `CheckFailed`, `HubError`) with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mm_convert.errors import CheckFailed, RequestError
from mm_convert.recipe import ConvertSpec, PublishSpec, Recipe, ValidateSpec, load_recipe

if TYPE_CHECKING:
    from mm_convert.commands.convert import ConvertResult
    from mm_convert.commands.inspect import Summary
    from mm_convert.commands.run import RunResult
    from mm_convert.plan.estimate import Estimate
    from mm_convert.publish.upload import PublishResult
    from mm_convert.read.download import DownloadResult
    from mm_convert.validators.report import Report

PathLike = str | os.PathLike


def convert(source: PathLike, out: PathLike, *, format: str | None = ConvertSpec.format,
            profile: str = ConvertSpec.profile, tp: int = ConvertSpec.tp, ep: int = ConvertSpec.ep,
            gpu_arch: str = ConvertSpec.gpu_arch, ranks: Sequence[int] | None = ConvertSpec.ranks,
            part_size: int = ConvertSpec.part_size, chunk_size: int = ConvertSpec.chunk_size,
            device: str = ConvertSpec.device, threads: int | None = None, revision: str | None = None,
            overwrite: bool = False, quiet: bool = False) -> ConvertResult:
    """Convert a MiniMax-M2 checkpoint for one serving shape.

    Args:
        source: a checkpoint folder, a Hugging Face cache snapshot folder, or a Hub repo id (fetched
            into the Hugging Face cache and read there in place; `revision` pins it).
        out: the output folder (created; a finished conversion there is kept and added to).
        format: "presharded" (SGLang's `--load-format presharded`; the default for the sglang
            profile) or "experts" (kernel-ready experts beside standard shards; trtllm's default).
        profile, tp, ep, gpu_arch, ranks, part_size, chunk_size, device, threads: as the
            `mm-convert convert` flags of the same names (sizes in bytes).
        overwrite: replace a different or unfinished conversion in `out` (swapped at commit).
        quiet: no progress bar.

    Returns:
        a `ConvertResult`: the plan, every file written with its sha256, the launch command.

    Raises:
        RequestError: an impossible shape or option. SourceError: a malformed source.
        OutputError: `out` cannot take it (locked, foreign files, too little disk). HubError.
    """
    from mm_convert.commands.convert import convert as run

    spec = _spec(format=format, profile=profile, tp=tp, ep=ep, gpu_arch=gpu_arch, ranks=ranks, part_size=part_size,
                 chunk_size=chunk_size, device=device)
    folder, options = _prepared(str(source), spec, revision, overwrite, quiet, threads)
    return run(folder, out, options)


def plan(source: PathLike, out: PathLike, *, format: str | None = ConvertSpec.format,
         profile: str = ConvertSpec.profile, tp: int = ConvertSpec.tp, ep: int = ConvertSpec.ep,
         gpu_arch: str = ConvertSpec.gpu_arch, ranks: Sequence[int] | None = ConvertSpec.ranks,
         part_size: int = ConvertSpec.part_size, revision: str | None = None) -> Estimate:
    """What `convert` with the same arguments would write (files, bytes per rank, total, free disk,
    launch command), from the source's headers alone; writes nothing (`convert --dry-run`).
    A Hub repo id is read from the Hugging Face cache if it is there; otherwise HubError says what
    the download would need."""
    from mm_convert.commands.convert import dry_run
    from mm_convert.hub_client import looks_like_repo_id
    from mm_convert.read.download import cached_snapshot_folder, download_size

    spec = _spec(format=format, profile=profile, tp=tp, ep=ep, gpu_arch=gpu_arch, ranks=ranks, part_size=part_size)
    source = str(source)
    if looks_like_repo_id(source) and not Path(source).exists():
        from mm_convert.errors import HubError

        cached = cached_snapshot_folder(source, revision)
        if cached is None:
            raise HubError(download_size(source, revision))
        source = str(cached)
    folder, options = _prepared(source, spec, revision, False, True, None)
    return dry_run(folder, out, options)


def validate(out: PathLike, *, source: PathLike | None = None, kernel: str = ValidateSpec.kernel,
             layers: Sequence[int] | None = ValidateSpec.layers, tokens: int = ValidateSpec.tokens,
             seed: int = ValidateSpec.seed, device: str | None = ValidateSpec.device,
             checks: Sequence[str] | None = None, allow_skip: bool = ValidateSpec.allow_skip,
             record: bool = False, raise_on_failure: bool = False, distributed: bool = False,
             world_size: int | None = None) -> Report:
    """Prove a converted checkpoint complete, exact and kernel-ready.

    Args:
        out: a converted checkpoint folder (only read, unless `record`).
        source: the source it came from: enables the exactness and quantisation-error checks.
        kernel: "auto", "reference", "triton", "cutlass" or "trtllm" for the kernel check.
        layers: layers for the kernel check (None: first, middle, last).
        checks: a subset of ("structure", "exact", "kernel"); None: all that apply.
        allow_skip: a check that cannot run here does not make the report incomplete.
        record: keep the summary in `out`'s manifest and model card.
        raise_on_failure: raise CheckFailed (naming the first failure) instead of returning a
            failed report.
        distributed: run the kernel check as the deployment does, one process per rank (each
            reading only its ranks' files onto its own GPU; gloo on CPU), partial outputs summed
            by all-reduce (mm_convert.validators.distributed). Always runs structure, exact and
            kernel (`checks` must be None).
        world_size: processes for `distributed` (default: the first shape's tp; it must divide tp).

    Returns:
        the `Report` (`.passed`, `.incomplete`, `.failures()`, `.to_dict()`).
    """
    from mm_convert.validators.run import validate as run
    from mm_convert.write.card import record_validation

    layer_list = list(layers) if layers is not None else None
    if distributed:
        from mm_convert.validators.checkpoint import ConvertedCheckpoint
        from mm_convert.validators.distributed import launch

        if checks is not None:
            raise RequestError("--distributed runs every check; leave out --checks")
        if world_size is None:
            with ConvertedCheckpoint.open(out) as ckpt:
                world_size = ckpt.block.shapes[0].parallel.tp
        report = launch(out, world_size, source, kernel, layer_list, tokens, seed, device, allow_skip)
    else:
        if world_size is not None:
            raise RequestError("--world-size applies to --distributed")
        report = run(out, source, kernel, layer_list, tokens, seed, device,
                     tuple(checks) if checks is not None else None, allow_skip)
    if record:
        record_validation(out, report)
    if raise_on_failure and not report.passed:
        failures = report.failures()
        raise CheckFailed(f"{out}: " + (failures[0].line() if failures else "a check did not run (incomplete)")
                          + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    return report


def inspect(path: PathLike) -> Summary:
    """Summarise a source or converted checkpoint (`.data` is plain data; `.render()` the text)."""
    from mm_convert.commands.inspect import inspect_path

    return inspect_path(path)


def download(repo_id: str, folder: PathLike | None = None, *, revision: str | None = None,
             quiet: bool = False) -> DownloadResult:
    """Fetch what a conversion needs from a pinned revision and verify every file's sha256.

    Without `folder` the files go into the Hugging Face cache (the result's `.folder` is the
    snapshot, which `convert` reads in place); with it, a plain copy. `HF_HUB_OFFLINE=1`: nothing is
    fetched and a missing file is named (HubError)."""
    from mm_convert.read.download import download as run

    return run(repo_id, folder, revision, quiet=quiet)


def publish(out: PathLike, repo_id: str, *, private: bool = PublishSpec.private,
            revision: str = PublishSpec.revision, batch_size: int = PublishSpec.batch_size,
            allow_failed_validation: bool = False, quiet: bool = False) -> PublishResult:
    """Upload a converted checkpoint in bounded commits, the card, config and manifest last; files the
    Hub already has are not uploaded again. The repo is created private unless `private=False`."""
    from mm_convert.publish.upload import publish as run

    return run(out, repo_id, private=private, revision=revision, batch_bytes=batch_size, quiet=quiet,
               allow_failed_validation=allow_failed_validation)


def run(recipe: PathLike | Recipe, *, quiet: bool = False) -> RunResult:
    """A recipe's whole pipeline (source, convert, validate, publish), each step skipped when its
    result is already there and verified. `RunResult.ok` is False when a step failed."""
    from mm_convert.commands.run import run_recipe

    return run_recipe(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), quiet=quiet)


def _spec(**fields) -> ConvertSpec:
    spec = replace(ConvertSpec(), **fields)
    if spec.ranks is not None:
        spec = replace(spec, ranks=tuple(sorted(set(int(r) for r in spec.ranks))))
    return spec


def _prepared(source: str, spec: ConvertSpec, revision: str | None, overwrite: bool, quiet: bool,
              threads: int | None, recipe_name: str | None = None):
    """The source folder to read (a Hub repo id fetched into the cache first) and the options."""
    from mm_convert.commands.convert import ConvertOptions
    from mm_convert.hub_client import looks_like_repo_id
    from mm_convert.read.download import DownloadRecord, download as fetch

    if revision is not None and not looks_like_repo_id(source):
        raise RequestError(f"--revision {revision}: applies to a Hub repo id as SOURCE, not to the folder {source}")
    if looks_like_repo_id(source) and not Path(source).exists():
        source = str(fetch(source, None, revision, quiet=quiet).folder)
    record = DownloadRecord.load(Path(source))
    options = ConvertOptions.from_spec(spec, overwrite=overwrite, quiet=quiet, recipe_name=recipe_name,
                                       torch_threads=threads,
                                       source_repo=record.repo_id if record else None,
                                       source_revision=record.revision if record else None,
                                       source_sha256=record.sha256s(Path(source)) if record else {})
    return source, options
