"""The kernel check as a TP/EP deployment runs it: one process per GPU (or per CPU share), each
reading only its own ranks' files onto its own device, running those ranks' routed FP8 MoE, and the
partial outputs summed with `torch.distributed.all_reduce` (NCCL on GPUs, gloo on CPU), as the
serving engine's all-reduce sums them.

The float32 reference is distributed the same way: each process computes it for the rows and
experts its ranks hold (from the source, or from its own files without `--source`), and the
partial references are summed too, so no process ever holds another rank's weights. MoE-TP rows and
EP expert blocks add up to the whole MoE exactly (in exact arithmetic; in float32 the order of the
sum moves the metrics by rounding only).

Two ways in:

    mm-convert validate OUT --distributed [--world-size N]      # spawns N local processes
    torchrun --nproc-per-node N -m mm_convert.validators.distributed OUT [--kernel triton] ...

A world of W processes takes a shape whose tp W divides; process p runs ranks p, p + W, ...
(W = tp: one rank per process, the deployment itself). Structure and exactness checks run once,
on process 0, before the kernel check; the report (process 0's) records the world size, the
collective backend, and each process's device, ranks, time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from mm_convert.errors import CheckFailed, MMConvertError
from mm_convert.output_format import ShapeEntry
from mm_convert.read.source import SourceCheckpoint
from mm_convert.validators import kernel_check
from mm_convert.validators.checkpoint import ConvertedCheckpoint
from mm_convert.validators.kernels.base import Backend
from mm_convert.validators.kernels.select import default_device, select
from mm_convert.validators.report import Finding, Report
from mm_convert.validators.routing import route

RENDEZVOUS_ENV = "MM_CONVERT_RENDEZVOUS"  # file:// init method from `launch`; torchrun's env:// otherwise
TIMEOUT = timedelta(seconds=900)  # a real-size layer on a slow rank; a dead rank ends the wait sooner (launch)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    backend: str  # "nccl" | "gloo"
    device: str  # "cuda:<local rank>" | "cpu"

    def ranks_of(self, entry: ShapeEntry) -> list[int]:
        """The shape's present ranks this process runs."""
        return [r for r in entry.present_ranks if r % self.size == self.rank]


def join_world(device: str) -> World:
    """Join the process group the launcher (ours or torchrun) set up in the environment."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        where, backend = f"cuda:{local_rank}", "nccl"
    else:
        where, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=os.environ.get(RENDEZVOUS_ENV, "env://"), rank=rank,
                                world_size=size, timeout=TIMEOUT)
    return World(rank, size, local_rank, backend, where)


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def _one(value):
    """Process 0's value, on every process."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rows_of(geometries):
    def rows(e: int) -> list[tuple[int, int]]:
        return [(g.row_start, g.row_start + g.real_rows) for g in geometries if e in g.experts and g.real_rows]

    return rows


def _sum(t: torch.Tensor, world: World) -> torch.Tensor:
    t = t.to(world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def _layer(ckpt: ConvertedCheckpoint, source: SourceCheckpoint | None, entry: ShapeEntry, layer: int,
           backend: Backend, world: World, tokens: int, seed: int) -> tuple[Finding | None, dict]:
    """One layer on every process; process 0 gets the finding, every process its own stats."""
    gate, bias = ckpt.router(entry, layer)
    hidden = kernel_check.hidden_states(tokens, ckpt.shape.hidden_size, seed, layer)
    inputs = kernel_check.make_inputs(hidden, route(hidden, gate, bias, ckpt.shape.top_k), ckpt.shape.num_experts)
    mine = world.ranks_of(entry)
    geometries = [entry.parallel.rank(ckpt.shape, r) for r in mine]
    started = time.monotonic()
    partial = torch.zeros(inputs.hidden_fp8.shape, dtype=torch.float32, device=backend.device)
    device_inputs = inputs.to(backend.device)
    error = None
    try:
        for r in mine:
            weights = kernel_check.rank_weights(ckpt, entry, r, layer).to(backend.device)
            out = torch.full(inputs.hidden_fp8.shape, float("nan"), dtype=torch.float32, device=backend.device)
            backend.run(device_inputs, weights, out)
            partial += out.float()
        if backend.device.startswith("cuda"):
            torch.cuda.synchronize(backend.device)
    except (MMConvertError, RuntimeError, ValueError) as exc:
        error = f"process {world.rank} (ranks {mine}): {' '.join(str(exc).split())}"
    seconds = time.monotonic() - started
    rows = _rows_of(geometries)
    experts = (kernel_check.source_experts(source, layer, backend.device) if source is not None
               else kernel_check.checkpoint_experts(ckpt, entry, layer, only_ranks=frozenset(mine)))
    reference = kernel_check.source_reference(inputs, experts, backend.device, rows)
    unquantised = None
    if source is not None and source.kind != "fp8":
        unquantised = kernel_check.source_reference(
            inputs, kernel_check.source_experts(source, layer, backend.device, quantised=False), backend.device, rows)
    errors = [e for e in _gathered(error, world) if e]
    out_sum, ref_sum = _sum(partial, world), _sum(reference, world)
    unq_sum = _sum(unquantised, world) if unquantised is not None else None
    stats = {"process": world.rank, "device": world.device, "ranks": mine, "seconds": round(seconds, 3),
             "peak_bytes": _peak_bytes(world.device)}
    if world.rank != 0:
        return None, stats
    if errors:
        return Finding(kernel_check.CHECK, "fail", f"cannot run: {errors[0]}", shape=entry.key, layer=layer), stats
    where = f"on {len(entry.present_ranks)} ranks in {world.size} processes ({world.backend} all-reduce)"
    return kernel_check.judge(out_sum, ref_sum, unq_sum, backend, entry, layer, seconds, where,
                              source is not None), stats


def _gathered(value, world: World) -> list:
    box = [None] * world.size
    dist.all_gather_object(box, value)
    return box


def run_process(out: str | Path, source: str | Path | None = None, kernel: str = "auto",
                layers: list[int] | None = None, tokens: int = 64, seed: int = 0, device: str | None = None,
                allow_skip: bool = False) -> Report | None:
    """This process's part of the distributed check; process 0 returns the report, the others None."""
    from mm_convert.validators.run import validate

    device = device or default_device()
    world = join_world(device)
    pre, error = None, None
    if world.rank == 0:
        try:  # the single-process checks, once; their argument checks stand for every process
            pre = validate(out, source, kernel, layers, tokens, seed, "cpu", ("structure", "exact"), allow_skip)
        except MMConvertError as exc:
            error = exc
    error = _one(error)
    if error is not None:
        raise error
    chosen = _one(pre.layers if pre else None)
    report = pre if world.rank == 0 else None
    broken = _one(frozenset(f.shape for f in pre.failures() if f.check == "structure" and f.shape) if pre else None)
    per_process: list[dict] = []
    started = time.monotonic()
    with ConvertedCheckpoint.open(out) as ckpt:
        selection = select(kernel, ckpt.profile.flags, device)
        src = SourceCheckpoint.open(source) if source is not None else None
        try:
            if report is not None:
                report.kernel_used = selection.backend.name if selection.backend else None
                report.kernel_note = selection.note
            for entry in ckpt.block.shapes:
                if selection.backend is None or entry.key in broken or entry.parallel.tp % world.size:
                    if report is not None:
                        why = (selection.note if selection.backend is None else
                               "not run: the structure check failed for this shape" if entry.key in broken else
                               f"not run: a world of {world.size} processes does not divide tp {entry.parallel.tp}")
                        report.add(Finding(kernel_check.CHECK, "skip", why, shape=entry.key))
                    continue
                for layer in chosen:
                    finding, stats = _layer(ckpt, src, entry, layer, selection.backend, world, tokens, seed)
                    gathered = _gathered(stats, world)
                    if report is not None:
                        finding.metrics.update(process_seconds=[s["seconds"] for s in gathered],
                                               process_peak_bytes=[s["peak_bytes"] for s in gathered])
                        report.add(finding)
                        per_process = gathered
        finally:
            if src is not None:
                src.close()
    devices = _gathered(_device_name(world.device), world)
    if report is not None:
        report.seconds["kernel"] = round(time.monotonic() - started, 3)
        report.distributed = {
            "world_size": world.size, "backend": world.backend,
            "processes": [{**s, "device_name": devices[s["process"]]} for s in per_process],
        }
    dist.barrier()
    return report


def launch(out: str | Path, world_size: int, source: str | Path | None = None, kernel: str = "auto",
           layers: list[int] | None = None, tokens: int = 64, seed: int = 0, device: str | None = None,
           allow_skip: bool = False, timeout_s: float = 3600) -> Report:
    """Run the distributed check in `world_size` local processes (one per GPU with CUDA) and return
    process 0's report. A process that dies ends the run with its last error line."""
    if not 1 <= world_size <= 64:
        raise CheckFailed(f"--world-size {world_size}: between 1 and 64")
    device = device or default_device()
    if device == "cuda" and torch.cuda.device_count() < world_size:
        raise CheckFailed(f"--world-size {world_size}: only {torch.cuda.device_count()} GPUs here (one per process)")
    with tempfile.TemporaryDirectory(prefix="mm-convert-dist-") as tmp:
        report_path = Path(tmp) / "report.json"
        args = [sys.executable, "-m", "mm_convert.validators.distributed", str(out), "--kernel", kernel,
                "--tokens", str(tokens), "--seed", str(seed), "--device", device, "--report-to", str(report_path)]
        if source is not None:
            args += ["--source", str(source)]
        if layers is not None:
            args += ["--layers", ",".join(map(str, layers)) if layers != [-1] else "all"]
        if allow_skip:
            args.append("--allow-skip")
        procs = []
        for rank in range(world_size):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                   RENDEZVOUS_ENV: f"file://{tmp}/rendezvous"}
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout_s
        failed = None
        while any(p.poll() is None for p in procs):
            dead = next((p for p in procs if p.poll() not in (None, 0, EXIT_REPORTED_FAILURE)), None)
            if dead is not None or time.monotonic() > deadline:
                failed = dead
                break
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.kill()
        errors = {i: p.communicate()[1] for i, p in enumerate(procs)}
        if failed is None:
            failed = next((p for p in procs if p.returncode not in (0, EXIT_REPORTED_FAILURE)), None)
        if failed is not None or not report_path.is_file():
            i = procs.index(failed) if failed is not None else 0
            last = (errors[i].strip().splitlines() or ["no output"])[-1]
            raise CheckFailed(f"distributed check: process {i} of {world_size} failed: {last}")
        return Report.from_dict(json.loads(report_path.read_text()))


EXIT_ERROR = 1  # the check could not run (bad arguments, a dead peer): no report
EXIT_REPORTED_FAILURE = 4  # it ran and the report says failed or incomplete


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m mm_convert.validators.distributed OUT ...`: process 0 prints the
    report (and writes it with --report); the exit status is the same on every process."""
    from mm_convert.validators.run import parse_layers

    p = argparse.ArgumentParser(prog="python -m mm_convert.validators.distributed",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--source")
    p.add_argument("--kernel", default="auto")
    p.add_argument("--layers")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--allow-skip", action="store_true")
    p.add_argument("--report", help="write the JSON report here (process 0)")
    p.add_argument("--report-to", help=argparse.SUPPRESS)  # `launch`'s hand-back
    a = p.parse_args(argv)
    try:
        report = run_process(a.out, a.source, a.kernel, parse_layers(a.layers), a.tokens, a.seed, a.device,
                             a.allow_skip)
    except MMConvertError as exc:
        print(f"mm-convert: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    passed = _one(report.passed if report is not None else None)
    if report is not None:
        for path in filter(None, (a.report, a.report_to)):
            report.save(Path(path))
        if not a.report_to:
            print(report.render())
    dist.destroy_process_group()
    return 0 if passed else EXIT_REPORTED_FAILURE


if __name__ == "__main__":
    sys.exit(main())
