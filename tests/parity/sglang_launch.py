"""Start one SGLang worker process per rank (tests/parity/sglang_worker.py) and collect what each held.

As `sglang.launch_server` starts one scheduler process per GPU, joined by a process group; here the
group is gloo over loopback TCP and the tensors live in CPU memory.
"""

from __future__ import annotations

import json
import os
import socket
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


def _free_ports(n: int) -> int:
    """The first of `n` consecutive free ports (each job of a worker uses its own)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n < 65536 and all(_is_free(first + i) for i in range(n)):
            return first
    raise RuntimeError("no run of free ports on 127.0.0.1")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def run_ranks(world: int, jobs: list[dict], out: Path, timeout: float = 600) -> dict[str, list[RankResult]]:
    """Run `jobs` (in order) on `world` rank processes; job id -> one result per rank."""
    out.mkdir(parents=True, exist_ok=True)
    jobs_file = out / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    port = _free_ports(len(jobs))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    procs = []
    for rank in range(world):
        log = open(out / f"worker-{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "tests.parity.sglang_worker", "--world", str(world), "--rank", str(rank),
             "--port", str(port), "--jobs", str(jobs_file), "--out", str(out)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
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
