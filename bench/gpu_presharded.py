"""The presharded format on a CUDA machine, in one run (for the lent H200):

    python3 bench/gpu_presharded.py --out DIR [--work /tmp/mmc-gpu]   # with mm_convert installed (bench/gpu_run.sh)

1. `quant.requant_ue8m0` (SGLang's SM100 re-quantisation of the FP8 linear layers, which mm-convert
   computes on the CPU) run on the GPU and on the CPU at MiniMax-M2.5's real per-rank attention
   shapes: the bytes must be identical (SGLang computes it on the GPU).
2. A real-size 2-layer FP8 checkpoint converted to presharded TP4 and TP8 (SM100) on the CPU and
   with `--device cuda`: the folders must be byte-identical.
3. `validate --kernel triton --source` on each: the routed FP8 MoE (mm-convert's Triton kernel) on
   every rank's experts as stored, against the float32 reference.

Prints a short table last and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from mm_convert.commands.convert import ConvertOptions, convert
from mm_convert.transform.quant import requant_ue8m0
from mm_convert.read.tiny import REAL_LAYER, make_synthetic
from mm_convert.validators.run import validate

# (rows, cols) of qkv_proj and o_proj per rank of MiniMax-M2.5 (48 q heads, 8 KV heads, head_dim 128, hidden 3072)
SHAPES = {
    "qkv TP1": (8192, 3072), "o TP1": (3072, 6144),
    "qkv TP4": (2048, 3072), "o TP4": (3072, 1536),
    "qkv TP8": (1024, 3072), "o TP8": (3072, 768),
}


def requant_cpu_vs_gpu(seed: int = 0) -> list[dict]:
    rows = []
    for name, (n, k) in SHAPES.items():
        gen = torch.Generator().manual_seed(seed)
        w = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
        w[(w & 0x7F) == 0x7F] -= 1  # no NaN encodings
        # Scales spread over four octaves, as a real checkpoint's (not powers of two).
        scale = 2.0 ** (torch.rand((-(-n // 128), -(-k // 128)), generator=gen) * 4 - 11)
        q_cpu, s_cpu = requant_ue8m0(w, scale)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        q_gpu, s_gpu = requant_ue8m0(w.cuda(), scale.cuda())
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({
            "shape": name, "weight_bytes_differ": int((q_cpu.view(torch.uint8) != q_gpu.cpu().view(torch.uint8)).sum()),
            "scale_words_differ": int((s_cpu != s_gpu.cpu()).sum()), "gpu_ms": round(seconds * 1e3, 2),
        })
    return rows


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmc-gpu"))
    ap.add_argument("--tps", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8])
    ap.add_argument("--skip-requant", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

    results["requant"] = [] if args.skip_requant else requant_cpu_vs_gpu()
    print(json.dumps(results["requant"]), flush=True)

    spec = replace(REAL_LAYER, num_layers=2, random_fp8_bytes=True)
    t0 = time.perf_counter()
    src = make_synthetic(args.work / "src", spec, "fp8", seed=0)
    results["source_seconds"] = round(time.perf_counter() - t0, 1)
    results["conversions"] = []
    for tp in args.tps:
        row: dict = {"tp": tp}
        for device in ("cpu", "cuda"):
            out = args.work / f"tp{tp}-{device}"
            t0 = time.perf_counter()
            convert(src, out, ConvertOptions(tp=tp, device=device, quiet=True))
            row[f"{device}_seconds"] = round(time.perf_counter() - t0, 1)
        row["identical"] = tree(args.work / f"tp{tp}-cpu") == tree(args.work / f"tp{tp}-cuda")
        t0 = time.perf_counter()
        report = validate(args.work / f"tp{tp}-cuda", src, kernel="triton", layers=[0, 1], tokens=256)
        row["validate_seconds"] = round(time.perf_counter() - t0, 1)
        row["passed"] = report.passed
        row["kernel"] = report.kernel_used
        row["kernel_rows"] = [{"layer": f.layer, **{k: f.metrics.get(k) for k in ("rel_l2", "cosine", "within_tolerance")}}
                              for f in report.kernel_rows()]
        row["failures"] = [f.line() for f in report.failures()][:5]
        results["conversions"].append(row)
        print(json.dumps(row), flush=True)
        for device in ("cpu", "cuda"):
            shutil.rmtree(args.work / f"tp{tp}-{device}", ignore_errors=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\n{'requant shape':<12}{'weight bytes differ':>22}{'scale words differ':>20}{'GPU ms':>9}")
    for r in results["requant"]:
        print(f"{r['shape']:<12}{r['weight_bytes_differ']:>22}{r['scale_words_differ']:>20}{r['gpu_ms']:>9}")
    print(f"\n{'shape':<6}{'cpu s':>7}{'cuda s':>8}{'identical':>11}{'kernel':>8}{'passed':>8}  layers: rel_l2 / cosine / in-tolerance")
    for r in results["conversions"]:
        layers = "; ".join(f"L{k['layer']} {k['rel_l2']:.4f} / {k['cosine']:.6f} / {k['within_tolerance']:.4f}"
                           for k in r["kernel_rows"])
        print(f"TP{r['tp']:<4}{r['cpu_seconds']:>7}{r['cuda_seconds']:>8}{str(r['identical']):>11}{str(r['kernel']):>8}"
              f"{str(r['passed']):>8}  {layers}")


if __name__ == "__main__":
    main()
