"""The `mm-convert` command line (SPEC section 6). Thin: parse, call, print.

Every failure is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from mm_convert import __version__
from mm_convert.errors import MMConvertError
from mm_convert.recipe import ConvertSpec, PublishSpec, ValidateSpec, load_recipe, override
from mm_convert.units import human_bytes, parse_size

SIZES_RULE = ("Sizes: decimal units as the Hub prints them (kB, MB, GB, TB = 10^3 ... 10^12 bytes); "
              "binary KiB, MiB, GiB, TiB are read too; a bare number is bytes.")

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Convert MiniMax-M2.5 into kernel-ready FP8 expert layouts for FlashInfer's routed MoE kernel.\n\n"
         + SIZES_RULE + " Exit status: 0 success, 1 failure, 2 usage error, 3 a validation check did not run, "
         "130 interrupted.",
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3  # validate: nothing failed, but a check asked for did not run
EXIT_INTERRUPTED = 130
log = logging.getLogger("mm_convert")


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    typer.echo(f"mm-convert: error: {message}", err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mm-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
          verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                      help="Say what each step decides (-vv: debug detail, and a traceback on an "
                                           "internal error).")):
    # Messages go to stderr, so `--json` and `download`'s snapshot path stay alone on stdout.
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="mm-convert: %(message)s", stream=sys.stderr)
    log.setLevel(level)
    if verbose >= 2:
        os.environ["MM_CONVERT_TRACEBACK"] = "1"


def _size(text: str | None, flag: str) -> int | None:
    return None if text is None else parse_size(text, flag)


@app.command("make-tiny")
def make_tiny(
    directory: Path = typer.Argument(..., help="Folder to create (must be empty or new)."),
    dtype: str = typer.Option("fp8", "--dtype", help="fp8 (as MiniMax-M2.5 ships) or bf16 (experts to quantise)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same bytes."),
):
    """Write a small random MiniMax-M2-shaped checkpoint (every tensor name, a real config.json)."""
    from mm_convert.read.tiny import TINY, make_synthetic

    out = make_synthetic(directory, TINY, dtype, seed)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    typer.echo(f"wrote {dtype} tiny checkpoint to {out} ({size / 1e6:.1f} MB, {TINY.num_layers} layers x {TINY.num_experts} experts)")


_C, _V, _P = ConvertSpec(), ValidateSpec(), PublishSpec()  # the defaults, shown in --help


@app.command()
def convert(
    source: Optional[str] = typer.Argument(None, help="Source folder, Hugging Face cache snapshot, or Hub repo id. "
                                           "Optional with --recipe."),
    out: Optional[Path] = typer.Argument(None, help="Output folder. Optional with --recipe."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A TOML recipe; flags override it."),
    fmt: Optional[str] = typer.Option(None, "--format", help="presharded (SGLang's --load-format presharded; the default "
                                      "for the sglang profile) or experts (kernel-ready experts beside standard shards)."),
    profile: Optional[str] = typer.Option(None, "--profile", help=f"sglang (MajorK, unshuffled) or trtllm (shuffled, "
                                          f"BlockMajorK). Default {_C.profile}."),
    tp: Optional[int] = typer.Option(None, "--tp", help=f"Tensor-parallel size of the serving launch (1-16). Default {_C.tp}."),
    ep: Optional[int] = typer.Option(None, "--ep", help=f"Expert-parallel size (divides tp and the experts). Default {_C.ep}."),
    part_size: Optional[str] = typer.Option(None, "--part-size", help=f"experts format: largest expert part file. "
                                            f"Default {human_bytes(_C.part_size)}."),
    gpu_arch: Optional[str] = typer.Option(None, "--gpu-arch", help=f"presharded: sm100 (Blackwell: the routed "
                                           f"kernel's GPU) or sm90 (Hopper; also what SGLang on a CPU holds). Default {_C.gpu_arch}."),
    ranks: Optional[str] = typer.Option(None, "--ranks", help="presharded: write only these ranks' files, e.g. 0,1 or 0-3 "
                                        "(byte-identical to a full run's). Default all."),
    device: Optional[str] = typer.Option(None, "--device", help=f"cpu or cuda: where quantisation and layout run. "
                                         f"Default {_C.device}."),
    chunk_size: Optional[str] = typer.Option(None, "--chunk-size", help=f"Working set per chunk of experts (memory vs. "
                                             f"speed). Default {human_bytes(_C.chunk_size)}."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="torch threads for quantising and layout. Default half the cores."),
    revision: Optional[str] = typer.Option(None, "--revision", help="With a Hub repo id as SOURCE: the revision to fetch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different or unfinished conversion in OUT."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (files, bytes per rank, total, free disk at "
                                 "OUT, launch command) and write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (or with --dry-run the plan) as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Quantise (BF16 sources), lay out and write one parallel shape; prints the launch command."""
    from mm_convert import api
    from mm_convert.hub_client import looks_like_repo_id
    from mm_convert.plan.build import parse_ranks
    from mm_convert.plan.estimate import render

    spec, source_path = ConvertSpec(), source
    if recipe is not None:
        from mm_convert.commands.run import prepare_source

        r = load_recipe(recipe)
        spec = r.convert
        source_path = source_path or str(prepare_source(r, quiet)[0])
        out = out or r.output_path
    spec = override(spec, profile=profile, tp=tp, ep=ep, device=device, format=fmt, gpu_arch=gpu_arch,
                    part_size=_size(part_size, "--part-size"), chunk_size=_size(chunk_size, "--chunk-size"))
    if ranks is not None:
        spec = override(spec, ranks=parse_ranks(ranks, spec.tp))
    if source_path is None or out is None:
        _fail("convert needs SOURCE and OUT (or a --recipe that names them)")
    shape = dict(format=spec.format, profile=spec.profile, tp=spec.tp, ep=spec.ep, gpu_arch=spec.gpu_arch,
                 ranks=spec.ranks, part_size=spec.part_size)
    if dry_run:
        estimate = api.plan(source_path, out, revision=revision, **shape)
        typer.echo(json.dumps({"source": source_path, "out": str(out), **estimate.as_dict()}, indent=2)
                   if as_json else render(estimate, source_path, out))
        return
    if looks_like_repo_id(source_path) and not Path(source_path).exists():
        fetched = api.download(source_path, revision=revision, quiet=quiet or as_json)
        typer.echo(f"{source_path}@{fetched.record.revision[:12]}: {len(fetched.downloaded)} files fetched or "
                   f"verified, converting from the Hugging Face cache at {fetched.folder}", err=True)
        source_path, revision = str(fetched.folder), None
    result = api.convert(source_path, out, **shape, chunk_size=spec.chunk_size, device=spec.device, threads=threads,
                         revision=revision, overwrite=overwrite, quiet=quiet or as_json)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    plan = result.plan
    typer.echo(
        f"converted to {result.out}: {result.label} "
        f"(moe_tp {plan.parallel.moe_tp}, I_p {plan.padded_intermediate_size}), {len(result.records)} files, "
        f"{human_bytes(result.bytes_written)} written, {result.files_reused} reused, {result.seconds:.1f} s"
    )
    if result.launch_command:
        typer.echo(f"serve it with:\n  {result.launch_command}")


@app.command()
def validate(
    out: Path = typer.Argument(..., help="A converted checkpoint folder."),
    source: Optional[Path] = typer.Option(None, "--source", help="The source it was converted from: enables exactness and quantisation-error checks."),
    kernel: str = typer.Option(_V.kernel, "--kernel", help="auto, reference, triton, cutlass or trtllm."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers for the kernel check, e.g. 0,30,61 or all (default: first, middle, last)."),
    tokens: int = typer.Option(_V.tokens, "--tokens", help="Random tokens per layer for the kernel check."),
    seed: int = typer.Option(_V.seed, "--seed", help="Seed of the random hidden states."),
    device: Optional[str] = typer.Option(_V.device, "--device", help="cpu or cuda for the reference backend (default: cuda if present)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the full JSON report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of the table."),
    record: bool = typer.Option(False, "--record", help="Also record the summary in OUT/mm_convert.json (for the model card)."),
    checks: Optional[str] = typer.Option(None, "--checks", help="Which checks to run: structure, exact, kernel "
                                         "(default: all; exact only with --source). One that cannot run fails."),
    allow_skip: bool = typer.Option(_V.allow_skip, "--allow-skip", help="Pass even if a check could not run here "
                                    "(e.g. --kernel trtllm off Blackwell); without it that exits 3."),
    distributed: bool = typer.Option(False, "--distributed", help="The kernel check as the deployment runs it: one "
                                     "process per rank (its own GPU; gloo on CPU), outputs all-reduced."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="--distributed: processes (default: the "
                                             "shape's tp; must divide it)."),
):
    """Prove a converted checkpoint complete, exact and kernel-ready; exit non-zero if any check fails."""
    from mm_convert import api
    from mm_convert.validators.run import parse_layers

    if report is not None and not report.parent.resolve().is_dir():
        _fail(f"--report {report}: the folder {report.parent} does not exist")
    result = api.validate(out, source=source, kernel=kernel, layers=parse_layers(layers), tokens=tokens, seed=seed,
                          device=device, allow_skip=allow_skip, record=record, distributed=distributed,
                          world_size=world_size,
                          checks=None if checks is None else tuple(c.strip() for c in checks.split(",") if c.strip()))
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.render())
    if report is not None:
        result.save(report)
    if not result.passed:
        raise typer.Exit(EXIT_INCOMPLETE if result.incomplete else EXIT_FAILED)


@app.command()
def download(
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. MiniMaxAI/MiniMax-M2.5."),
    directory: Optional[Path] = typer.Argument(None, help="A folder for a plain copy; without it the files go into the Hugging Face cache (HF_HUB_CACHE), read in place by convert."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit; resolved to a commit and recorded."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Fetch what a conversion needs from a pinned revision; verify every large file's sha256.

    HF_HUB_OFFLINE=1: fetch nothing, check the cached snapshot and say what is missing."""
    from mm_convert import api

    r = api.download(repo_id, directory, revision=revision, quiet=quiet)
    summary = (f"{repo_id}@{r.record.revision} in {r.folder}: {len(r.downloaded)} files fetched and verified, "
               f"{len(r.reused)} already there, {r.seconds:.1f} s")
    if directory is None:  # like `hf download`: the snapshot folder alone on stdout, for SOURCE=$(...)
        typer.echo(summary, err=True)
        typer.echo(str(r.folder))
    else:
        typer.echo(summary)


@app.command()
def publish(
    out: Path = typer.Argument(..., help="A converted checkpoint folder."),
    repo_id: str = typer.Argument(..., help="Hub repo to create or update."),
    private: bool = typer.Option(_P.private, "--private/--public", help="Create the repo private (the default) or public."),
    revision: str = typer.Option(_P.revision, "--revision", help="Branch to publish to (created if needed)."),
    batch_size: str = typer.Option(human_bytes(_P.batch_size).replace(" ", ""), "--batch-size", help="Largest commit."),
    allow_failed_validation: bool = typer.Option(False, "--allow-failed-validation", help="Publish even if a recorded validation failed."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Upload in bounded commits (model card, config and manifest last); a rerun uploads only what is missing."""
    from mm_convert import api

    r = api.publish(out, repo_id, private=private, revision=revision, batch_size=parse_size(batch_size, "--batch-size"),
                    quiet=quiet, allow_failed_validation=allow_failed_validation)
    if not r.commits:
        typer.echo(f"{repo_id}@{revision}: already up to date ({len(r.unchanged)} files); nothing uploaded, no commit")
    else:
        typer.echo(f"published to {repo_id}@{revision}: {len(r.uploaded)} files ({human_bytes(r.uploaded_bytes)}) in "
                   f"{len(r.commits)} commit(s), {len(r.unchanged)} already there, {r.seconds:.1f} s")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="A recipe (TOML): download -> convert -> validate -> publish."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """The whole pipeline of a recipe; each step skipped when its result is already there and verified."""
    from mm_convert import api

    result = api.run(recipe, quiet=quiet)
    typer.echo(result.render())


@app.command()
def inspect(path: Path = typer.Argument(..., help="A source or converted checkpoint folder."),
            as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Summarise a checkpoint: architecture, dtypes, experts, parallel shapes, manifest status.
    For a source, each shape's plan (files, bytes per rank) is what `convert --dry-run` prints."""
    from mm_convert.commands.inspect import inspect_path

    summary = inspect_path(path)
    typer.echo(summary.to_json() if as_json else summary.render())


def _release_big_buffers_to_the_os() -> None:
    """Make glibc serve every allocation over 1 MiB with mmap, so freed tensors go back to the OS.

    Without it glibc raises its mmap threshold as large blocks are freed and keeps them in its heap,
    and the resident peak drifts up by about a chunk of experts over the first layers.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def main(argv: list[str] | None = None) -> None:
    """The console entry point: every failure is one line on stderr and a non-zero exit status."""
    _release_big_buffers_to_the_os()
    args = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app)
    try:
        # standalone_mode=False: usage errors and Ctrl-C come back here instead of click's boxed messages.
        code = command.main(args=args, prog_name="mm-convert", standalone_mode=False)
    except MMConvertError as exc:
        _die(str(exc), EXIT_FAILED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _die("interrupted; finished files are kept and a rerun resumes", EXIT_INTERRUPTED)
    except typer.TyperException as exc:  # usage errors: a bad option, a missing argument, an unknown command
        ctx = getattr(exc, "ctx", None)
        where = f"mm-convert {ctx.info_name}" if ctx is not None and ctx.parent is not None else "mm-convert"
        _die(" ".join(exc.format_message().split()) + f" (see {where} --help)", getattr(exc, "exit_code", EXIT_USAGE))
    except OSError as exc:  # a file the command was pointed at, with the system's reason
        if os.environ.get("MM_CONVERT_TRACEBACK"):
            raise
        _die(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - never a traceback on the command line
        if os.environ.get("MM_CONVERT_TRACEBACK"):
            raise
        _die(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (a bug: please report it; "
             "set MM_CONVERT_TRACEBACK=1 to see where)", EXIT_FAILED)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into this exit status; no command of ours returns it
        _die("interrupted; finished files are kept and a rerun resumes", EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


def _die(message: str, code: int) -> None:
    typer.echo(f"mm-convert: error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
