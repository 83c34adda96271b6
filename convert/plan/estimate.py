"""What a conversion will write, known before any byte moves: for `convert --dry-run` and for the
disk-space check every conversion makes before it takes the output folder.

The experts format's plan has every file's exact size. A presharded folder's files depend on which
non-expert tensors turn out equal (they are stored once); the estimate assumes only those the plan
proves equal (the same recipe), so it is an upper bound, tight to well under 1% (experts dominate).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mm_convert import output_format
from mm_convert.plan import presharded, sglang_state
from mm_convert.errors import OutputError
from mm_convert.plan.build import ConversionPlan, PreshardedPlan, lay_out_presharded
from mm_convert.units import human_bytes

DISK_MARGIN = 1.02  # 2% slack: the filesystem's own blocks and the small files written at the end


@dataclass(frozen=True)
class FilePlanned:
    path: str
    bytes: int


@dataclass(frozen=True)
class Estimate:
    """A conversion's output, before it runs."""

    label: str
    format: str
    files: tuple[FilePlanned, ...]  # tensor files (shards, expert parts, presharded files)
    rank_bytes: tuple[int, ...]  # the bytes each rank loads
    total_bytes: int  # on disk in OUT once finished (small files aside)
    present_bytes: int  # of those, already in OUT (staged by an interrupted run, or kept from an earlier one)
    free_bytes: int  # free at OUT (or its nearest existing parent)
    launch_command: str | None

    @property
    def needed_bytes(self) -> int:
        return max(0, self.total_bytes - self.present_bytes)

    @property
    def fits(self) -> bool:
        return self.needed_bytes * DISK_MARGIN <= self.free_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(needed_bytes=self.needed_bytes, fits=self.fits)
        return d


def free_bytes_at(path: Path) -> int:
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _present_bytes(out: Path, paths: set[str], whole_folders: bool) -> int:
    """Bytes of planned files already under OUT: staged (`.mm-convert/staging`) or finished.

    A presharded file's name depends on which tensors turned out equal, so there every file in the
    plan's folders counts (the folder's key is a hash of the shape's names, shapes and dtypes: its
    files belong to this plan)."""
    total = 0
    for base in (out / ".mm-convert" / "staging", out):
        if whole_folders:
            found = {p for rel in {str(Path(r).parent) for r in paths} if (base / rel).is_dir()
                     for p in (base / rel).iterdir()}
        else:
            found = {base / rel for rel in paths}
        total += sum(p.stat().st_size for p in found
                     if p.suffix in (".safetensors", ".safetensor") and p.is_file() and not p.is_symlink())
    return total


def planned_files(plan: ConversionPlan | PreshardedPlan) -> tuple[tuple[FilePlanned, ...], tuple[int, ...]]:
    """The tensor files `plan` writes and the bytes each rank loads; pure, from the plan alone."""
    if isinstance(plan, ConversionPlan):
        per_rank = [sum(f.size for f in plan.shards)] * plan.parallel.tp  # every rank reads the shared shards
        for f in plan.expert_files:
            per_rank[f.rank] += f.size  # type: ignore[index]
        return tuple(FilePlanned(f.path, f.size) for f in plan.files), tuple(per_rank)
    # Non-expert tensors of equal recipe are equal; equal contents from other recipes are not
    # assumed (the conversion finds those by hashing, and stores them once: fewer bytes).
    keys = [{t.name: repr(sglang_state.recipe_identity(t)) for t in state
             if not isinstance(t.recipe, sglang_state.ExpertTensor)} for state in plan.states]
    lay = lay_out_presharded(plan, keys)
    return (tuple(FilePlanned(f.path, f.size) for f in lay.needed),
            tuple(sum(t.nbytes for t in state) for state in plan.states))


def estimate(plan: ConversionPlan | PreshardedPlan, out: Path, overwrite: bool = False) -> Estimate:
    """The files `plan` writes into `out`, their bytes per rank, and the disk they need there."""
    out = Path(out)
    files, per_rank = planned_files(plan)
    if isinstance(plan, ConversionPlan):
        label, fmt, launch = f"experts, profile {plan.profile.name}, {plan.parallel.label}", "experts", None
    else:
        label, fmt = f"presharded {plan.parallel.label} for {plan.target.gpu_arch}", "presharded"
        launch = presharded.launch_command(str(out.absolute()), plan.parallel.tp, plan.parallel.ep, plan.root,
                                           sglang_state.MOE_RUNNER_BACKEND)
    previous_ok = not overwrite and (out / output_format.MANIFEST_NAME).is_file()
    present = _present_bytes(out, {f.path for f in files}, fmt == "presharded") if previous_ok or (out / ".mm-convert").is_dir() else 0
    if fmt == "presharded" and previous_ok and files and \
            (out / Path(files[0].path).parent / presharded.READY_NAME).is_file():
        present = sum(f.bytes for f in files)  # finished (READY is written last): a rerun writes nothing
    return Estimate(label, fmt, files, tuple(per_rank), sum(f.bytes for f in files), present,
                    free_bytes_at(out), launch)


def check_disk(est: Estimate, out: Path) -> None:
    """Refuse now, before the output folder is touched, when the disk cannot hold the output."""
    if not est.fits:
        raise OutputError(
            f"{out}: the output needs {human_bytes(est.needed_bytes)} more but only {human_bytes(est.free_bytes)} is "
            f"free there; nothing was written (see `mm-convert convert ... --dry-run`)")


def render(est: Estimate, source: str, out: Path) -> str:
    h = human_bytes
    lines = [
        f"dry run: {source} -> {out}",
        f"  {est.label}: {len(est.files)} tensor files, {h(est.total_bytes)}"
        + (" (at most: equal non-expert tensors are stored once)" if est.format == "presharded" else ""),
        "  per rank: " + ", ".join(f"rank {r} {h(b)}" for r, b in enumerate(est.rank_bytes)),
        f"  already in OUT: {h(est.present_bytes)}; still to write: {h(est.needed_bytes)}; "
        f"free at OUT: {h(est.free_bytes)} -> {'fits' if est.fits else 'DOES NOT FIT'}",
    ]
    if est.launch_command:
        lines += ["  serve it with:", f"    {est.launch_command}"]
    lines.append("  nothing was written")
    return "\n".join(lines)

