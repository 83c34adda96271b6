"""Conversion speed and memory, side by side with a plain copy and llm-compressor.

    python bench/bench_convert.py [--layers 2] [--rounds 2] [--work DIR] [--llmcompressor-python PY]

Makes synthetic checkpoints with MiniMax-M2.5's real per-layer shapes (256 experts, hidden 3072,
intermediate 1536; FP8 = random bytes with random scales, BF16 = Gaussian), then times, in one run
and alternating between tasks each round:

  copy-fp8 / copy-bf16     a plain copy of the source files (the floor: read once, write once)
  fp8->presharded-tp4      mm-convert convert, FP8 source, SGLang presharded (the sglang profile's
                           default: a hashing pass over the source, then the write pass)
  fp8->sglang-tp4          mm-convert convert --format experts, FP8 source
  fp8->trtllm-tp4          mm-convert convert, FP8 source
  bf16->sglang-tp4         mm-convert convert, BF16 source quantised to FP8
  fp8->trtllm+allthr,      the same conversions with torch's own default thread count (one per
  bf16->sglang+allthr      core; not run unless named in --tasks): the baseline for --threads
  llmc-bf16                llm-compressor model_free_ptq FP8_BLOCK on the BF16 source (CPU), if a
                           Python with llmcompressor is given (installed only for the benchmark)

Each task runs in its own process (page cache dropped first where permitted); the table gives wall
time, peak resident memory (VmHWM of that process), source bytes per second, and the ratio to the
copy of the same source. Results and the machine description go to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Each task is a small program run by a fresh interpreter; it prints VmHWM last.
PEAK = """
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import json
print("PEAK_BYTES " + json.dumps(_peak()))
"""
COPY = """
import os, shutil, sys
src, dst = sys.argv[1:3]
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    fd = os.open(os.path.join(dst, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""
CONVERT = """
import sys
from mm_convert.cli import main
src, dst, profile = sys.argv[1:4]
sys.argv = ["mm-convert", "convert", src, dst, "--profile", profile, "--tp", "4", "--quiet"] + sys.argv[4:]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
"""
LLMC = """
import sys
from llmcompressor import model_free_ptq
src, dst = sys.argv[1:3]
model_free_ptq(model_stub=src, save_directory=dst, scheme="FP8_BLOCK",
               ignore=["re:.*gate$", "lm_head", "model.embed_tokens", "re:.*self_attn.*", "re:.*e_score_correction_bias$"],
               max_workers=2, device="cpu")
"""


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_task(python: str, program: str, args: list[str], env: dict | None = None) -> dict:
    dropped = drop_caches()
    started = time.monotonic()
    proc = subprocess.run([python, "-c", program + PEAK, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    wall = time.monotonic() - started
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": wall}
    peak = next(json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_BYTES"))
    return {"wall_s": round(wall, 2), "peak_bytes": peak, "cache_dropped": dropped}


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        info["mem_gib"] = round(int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["disk_free_gb"] = round(shutil.disk_usage("/tmp").free / 1e9, 1)
    return info


def make_sources(work: Path, layers: int, kinds: set[str]) -> dict[str, Path]:
    from mm_convert.read.tiny import REAL_LAYER, make_synthetic

    spec = replace(REAL_LAYER, num_layers=layers, num_shards=2 * layers + 1)
    sources = {}
    for dtype, fast in (("fp8", True), ("bf16", False)):
        if dtype not in kinds:
            continue
        path = work / f"src-{dtype}-{layers}L"
        if not (path / "config.json").exists():
            t0 = time.monotonic()
            shutil.rmtree(path, ignore_errors=True)
            make_synthetic(path, replace(spec, random_fp8_bytes=fast), dtype, seed=0)
            print(f"made {path} in {time.monotonic() - t0:.0f} s", flush=True)
        sources[dtype] = path
    return sources


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmc-bench"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "convert.json")
    ap.add_argument("--llmcompressor-python", default=None, help="A Python with llmcompressor installed.")
    ap.add_argument("--tasks", default="copy-fp8,fp8->presharded-tp4,fp8->sglang-tp4,fp8->trtllm-tp4,copy-bf16,"
                                       "bf16->sglang-tp4,llmc-bf16")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    import torch

    torch_default_threads = str(torch.get_num_threads())  # what torch would use if --threads did not set it
    tasks = {
        "copy-fp8": (py, COPY, "fp8", []),
        "fp8->presharded-tp4": (py, CONVERT, "fp8", ["sglang", "--format", "presharded"]),
        "fp8->sglang-tp4": (py, CONVERT, "fp8", ["sglang", "--format", "experts"]),
        "fp8->trtllm-tp4": (py, CONVERT, "fp8", ["trtllm"]),
        "copy-bf16": (py, COPY, "bf16", []),
        "bf16->presharded-tp4": (py, CONVERT, "bf16", ["sglang", "--format", "presharded"]),
        "bf16->sglang-tp4": (py, CONVERT, "bf16", ["sglang", "--format", "experts"]),
        "llmc-bf16": (args.llmcompressor_python, LLMC, "bf16", []),
        # The baseline for the --threads default: torch's own default of one thread per core.
        "fp8->trtllm+allthr": (py, CONVERT, "fp8", ["trtllm", "--threads", torch_default_threads]),
        "bf16->sglang+allthr": (py, CONVERT, "bf16", ["sglang", "--format", "experts", "--threads", torch_default_threads]),
    }
    chosen = [t for t in args.tasks.split(",") if t in tasks and (t != "llmc-bf16" or args.llmcompressor_python)]
    sources = make_sources(args.work, args.layers, {tasks[t][2] for t in chosen})
    results: dict[str, list[dict]] = {t: [] for t in chosen}
    for round_ in range(args.rounds):
        order = chosen if round_ % 2 == 0 else list(reversed(chosen))
        for name in order:
            python, program, kind, extra = tasks[name]
            dst = args.work / f"out-{name.replace('>', '').replace('-', '_')}"
            shutil.rmtree(dst, ignore_errors=True)
            r = run_task(python, program, [str(sources[kind]), str(dst), *extra])
            r["bytes_in"] = folder_bytes(sources[kind])
            r["bytes_out"] = folder_bytes(dst) if dst.exists() else 0
            results[name].append(r)
            print(f"round {round_} {name}: {json.dumps(r)[:300]}", flush=True)
            shutil.rmtree(dst, ignore_errors=True)

    table = []
    copy_time = {k: statistics.median(r["wall_s"] for r in results[f"copy-{k}"] if "error" not in r)
                 for k in ("fp8", "bf16") if any("error" not in r for r in results.get(f"copy-{k}", []))}
    for name in chosen:
        ok = [r for r in results[name] if "error" not in r]
        if not ok:
            table.append({"task": name, "error": results[name][0]["error"][-400:]})
            continue
        wall = statistics.median(r["wall_s"] for r in ok)
        kind = tasks[name][2]
        table.append({
            "task": name, "wall_s": wall, "walls": [r["wall_s"] for r in ok],
            "peak_gib": round(max(r["peak_bytes"] for r in ok) / 2**30, 2),
            "gb_in": round(ok[0]["bytes_in"] / 1e9, 2), "gb_out": round(ok[0]["bytes_out"] / 1e9, 2),
            "source_mb_s": round(ok[0]["bytes_in"] / wall / 1e6, 1),
            "vs_copy": round(wall / copy_time[kind], 2) if kind in copy_time else None,
        })
    doc = {"machine": machine(), "layers": args.layers, "rounds": args.rounds, "table": table, "runs": results,
           "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"\n{'task':<22}{'wall s':>8}{'peak GiB':>10}{'GB in':>7}{'GB out':>8}{'MB/s in':>9}{'x copy':>8}")
    for row in table:
        if "error" in row:
            print(f"{row['task']:<22} ERROR {row['error'][-200:]}")
            continue
        print(f"{row['task']:<22}{row['wall_s']:>8.1f}{row['peak_gib']:>10.2f}{row['gb_in']:>7.1f}{row['gb_out']:>8.1f}"
              f"{row['source_mb_s']:>9.0f}{(row['vs_copy'] or 0):>8.2f}")
    walls = {r["task"]: r["wall_s"] for r in table if "error" not in r}
    for default, all_threads in (("fp8->trtllm-tp4", "fp8->trtllm+allthr"), ("bf16->sglang-tp4", "bf16->sglang+allthr")):
        if default in walls and all_threads in walls:
            print(f"{default} with {torch_default_threads} torch threads takes {walls[all_threads] / walls[default]:.2f}x the default's time")
    llmc = next((r for r in table if r["task"] == "llmc-bf16" and "error" not in r), None)
    ours = next((r for r in table if r["task"] == "bf16->sglang-tp4" and "error" not in r), None)
    if llmc and ours:
        print(f"bf16->sglang-tp4 is {llmc['wall_s'] / ours['wall_s']:.1f}x faster than llm-compressor model_free_ptq")


if __name__ == "__main__":
    main()
