"""The distributed kernel check on a CUDA machine, in one run:

    python3 bench/gpu_distributed.py --out DIR [--work /tmp/mmc-dist] [--world-size N]

A real-size MiniMax-M2.5 layer (FP8, 256 experts) converted to presharded TP4 and TP8 on the GPU,
then for each: the single-process kernel check (every rank in turn on one GPU, summed there) and
the distributed one (`validators.distributed.launch`: N processes, NCCL all-reduce; N = the GPUs
here, 1 on a single-GPU machine, which then runs every rank in its one process through the same
code). Prints a table last and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from mm_convert.commands.convert import ConvertOptions, convert
from mm_convert.read.tiny import REAL_LAYER, make_synthetic
from mm_convert.validators.distributed import launch
from mm_convert.validators.run import validate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmc-dist"))
    ap.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                     "world_size": args.world_size, "tokens": args.tokens, "shapes": []}
    started = time.monotonic()
    src = make_synthetic(args.work / "src", replace(REAL_LAYER, num_layers=1), "fp8", seed=0)
    results["make_source_s"] = round(time.monotonic() - started, 1)
    for tp in (4, 8):
        out = args.work / f"tp{tp}"
        t0 = time.monotonic()
        convert(src, out, ConvertOptions(tp=tp, device="cuda", quiet=True))
        row = {"tp": tp, "convert_s": round(time.monotonic() - t0, 1)}
        torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        single = validate(out, src, "triton", tokens=args.tokens, checks=("kernel",))
        row["single_s"] = round(time.monotonic() - t0, 1)
        row["single_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        t0 = time.monotonic()
        dist = launch(out, args.world_size, src, "triton", tokens=args.tokens, device="cuda")
        row["distributed_s"] = round(time.monotonic() - t0, 1)
        for name, rep in (("single", single), ("distributed", dist)):
            rows = rep.kernel_rows()
            row[f"{name}_passed"] = rep.passed
            row[f"{name}_kernel"] = rep.kernel_used
            row[f"{name}_rel_l2"] = [f.metrics["rel_l2"] for f in rows]
            row[f"{name}_cosine"] = [f.metrics["cosine"] for f in rows]
            row[f"{name}_layer_s"] = [f.metrics["seconds"] for f in rows]
        row["distributed"] = dist.distributed
        row["distributed_failures"] = [f.line() for f in dist.failures()][:5]
        results["shapes"].append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'shape':<6}{'world':>6}{'single rel_l2':>15}{'dist rel_l2':>13}{'dist cosine':>13}"
          f"{'single s':>10}{'dist s':>8}{'peak/proc':>11}  pass")
    for r in results["shapes"]:
        peak = max(p["peak_bytes"] for p in r["distributed"]["processes"])
        print(f"TP{r['tp']:<4}{args.world_size:>6}{r['single_rel_l2'][0]:>15.3e}{r['distributed_rel_l2'][0]:>13.3e}"
              f"{r['distributed_cosine'][0]:>13.6f}{r['single_layer_s'][0]:>10.2f}{r['distributed_layer_s'][0]:>8.2f}"
              f"{peak / 2**30:>9.2f}Gi  {r['single_passed']}/{r['distributed_passed']}")


if __name__ == "__main__":
    main()
