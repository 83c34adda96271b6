"""The whole job of a recipe: source -> convert -> validate -> publish (`mm-convert run`).

Each step is skipped when its result is already there and verified: a downloaded source whose
files match the download record, a conversion whose files re-hash to their records (convert
verifies and rewrites nothing), a validation recorded as passed for the same settings on files that
did not change, a publish that finds every file already on the Hub.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mm_convert.errors import CheckFailed, MMConvertError
from mm_convert.recipe import Recipe
from mm_convert.read.tiny import TINY, make_synthetic


@dataclass
class StepResult:
    step: str
    status: str  # done, skipped, failed
    seconds: float
    detail: str


@dataclass
class RunResult:
    recipe: str
    steps: list[StepResult] = field(default_factory=list)
    launch_command: str | None = None  # how SGLang serves what was converted (presharded)

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.steps)

    def render(self) -> str:
        lines = [f"mm-convert run {self.recipe}", f"{'step':<10}{'status':<9}{'seconds':>8}  detail"]
        lines += [f"{s.step:<10}{s.status:<9}{s.seconds:>8.1f}  {s.detail}" for s in self.steps]
        if self.launch_command:
            lines += ["serve it with:", f"  {self.launch_command}"]
        return "\n".join(lines)


def tiny_source_dir(recipe: Recipe) -> Path:
    return recipe.work_path / f"source-tiny-{recipe.source.tiny_dtype}-seed{recipe.source.tiny_seed}"


def prepare_source(recipe: Recipe, quiet: bool = False) -> tuple[Path, bool, str]:
    """The local source folder a recipe converts (made or downloaded if needed), whether that took
    any work, and what happened."""
    spec = recipe.source
    if spec.path is not None:
        return Path(spec.path), False, f"local folder {spec.path}"
    if spec.is_tiny:
        folder = tiny_source_dir(recipe)
        if (folder / "config.json").is_file():
            return folder, False, f"built-in tiny model already at {folder}"
        make_synthetic(folder, TINY, spec.tiny_dtype or "fp8", spec.tiny_seed)
        return folder, True, f"made the built-in tiny model ({spec.tiny_dtype}, seed {spec.tiny_seed}) at {folder}"
    from mm_convert.read.download import download

    result = download(spec.repo_id or "", None, spec.revision, quiet=quiet)
    return result.folder, bool(result.downloaded), (
        f"{spec.repo_id}@{result.record.revision[:12]}: {len(result.downloaded)} fetched and verified, "
        f"{len(result.reused)} already verified, in the Hugging Face cache")


def _step(result: RunResult, name: str, fn):
    started = time.monotonic()
    try:
        status, detail, value = fn()
    except MMConvertError as exc:
        result.steps.append(StepResult(name, "failed", time.monotonic() - started, str(exc)))
        raise
    result.steps.append(StepResult(name, status, time.monotonic() - started, detail))
    return value


def run_recipe(recipe: Recipe, quiet: bool = False) -> RunResult:
    from mm_convert.commands.convert import ConvertOptions, convert
    from mm_convert.read.download import DownloadRecord
    from mm_convert.write.manifest import Manifest

    result = RunResult(str(recipe.path or recipe.name))
    out = recipe.output_path
    spec = recipe.convert

    def source_step():
        folder, worked, detail = prepare_source(recipe, quiet)
        return ("done" if worked else "skipped"), detail, folder

    source = _step(result, "source", source_step)
    record = DownloadRecord.load(source)

    def convert_step():
        r = convert(source, out, ConvertOptions.from_spec(
            spec, quiet=quiet, source_repo=record.repo_id if record else None,
            source_revision=record.revision if record else None,
            source_sha256=record.sha256s(source) if record else {}, recipe_name=recipe.name))
        status = "done" if r.data_files_written else "skipped"
        detail = (f"{r.label} into {out}: {r.bytes_written / 1e6:.1f} MB written, "
                  f"{r.files_reused} files verified and kept")
        return status, detail, r

    converted = _step(result, "convert", convert_step)
    result.launch_command = converted.launch_command

    def validate_step():
        from mm_convert.validators.run import validate
        from mm_convert.write.card import record_validation

        v = recipe.validate
        if not v.enabled:
            return "skipped", f"[validate] enabled = false in {recipe.path}", None
        label = converted.shape.key
        settings = {"kernel_requested": v.kernel, "tokens": v.tokens, "seed": v.seed}
        previous = Manifest.load(out).validation.get(label)
        if not converted.data_files_written and previous and previous.passed and previous.settings == settings:
            return "skipped", f"passed before with the same settings ({previous.kernel}); files unchanged", None
        rep = validate(out, source, v.kernel, list(v.layers) if v.layers is not None else None, v.tokens, v.seed)
        record_validation(out, rep, settings)
        if not rep.passed:
            raise CheckFailed(f"validation failed: {rep.failures()[0].line()} (and {len(rep.failures()) - 1} more)")
        return "done", f"passed: kernel {rep.kernel_used}, layers {rep.layers}, {len(rep.findings)} checks", rep

    _step(result, "validate", validate_step)

    def publish_step():
        p = recipe.publish
        if not p.enabled:
            return "skipped", (f"[publish] enabled = false in {recipe.path}: nothing uploaded (set it, a repo_id, and "
                               "HF_TOKEN; HF_ENDPOINT for a local Hub server)"), None
        if not os.environ.get("HF_TOKEN") and _no_saved_token():
            return "skipped", "no Hub token (HF_TOKEN or `hf auth login`): nothing uploaded", None
        from mm_convert.publish.upload import publish

        r = publish(out, p.repo_id or "", private=p.private, revision=p.revision, quiet=quiet)
        if not r.commits:
            return "skipped", f"{p.repo_id}@{p.revision}: already up to date ({len(r.unchanged)} files), no commit", r
        return "done", (f"{p.repo_id}@{p.revision}: {len(r.uploaded)} files ({r.uploaded_bytes / 1e6:.1f} MB) in "
                        f"{len(r.commits)} commit(s), {len(r.unchanged)} unchanged"), r

    _step(result, "publish", publish_step)
    return result


def _no_saved_token() -> bool:
    try:
        from huggingface_hub import get_token

        return get_token() is None
    except Exception:  # noqa: BLE001
        return True
