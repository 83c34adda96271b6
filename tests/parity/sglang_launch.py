"""Start one SGLang worker process per rank (tests/parity/sglang_worker.py) and collect what each held.

As `sglang.launch_server` starts one scheduler process per GPU, joined by a process group; here the
group is gloo over loopback TCP (met through a file) and the tensors live in CPU memory.
"""

from __future__ import annotations

import json
import os
import time
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    ok: bool
    error: str | None
    dumped: bool
    path: Path

    def state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path))


def run_ranks(world: int, jobs: list[dict], out: Path, timeout: float = 600) -> dict[str, list[RankResult]]:
    """Run `jobs` (in order) on `world` rank processes; job id -> one result per rank."""
    out.mkdir(parents=True, exist_ok=True)
    jobs_file = out / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    procs = []
    for rank in range(world):
        log = open(out / f"worker-{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "tests.parity.sglang_worker", "--world", str(world), "--rank", str(rank),
             "--rendezvous", str(out / "rendezvous"), "--jobs", str(jobs_file), "--out", str(out)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    try:
        # One deadline for all; a rank that dies stops the wait (the others would wait for it).
        while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    results: dict[str, list[RankResult]] = {}
    for job in jobs:
        row = []
        for rank in range(world):
            status = out / f"{job['id']}-rank{rank}.json"
            if not status.exists():
                tail = (out / f"worker-{rank}.log").read_text()[-3000:]
                raise RuntimeError(f"rank {rank} wrote no result for job {job['id']}; its log ends:\n{tail}")
            d = json.loads(status.read_text())
            row.append(RankResult(d["ok"], d["error"], d["dumped"], out / f"{job['id']}-rank{rank}.safetensors"))
        results[job["id"]] = row
    return results
