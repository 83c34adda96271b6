"""The GPU conversion path (`convert --device cuda`), measured on a real-size layer.

    python bench/gpu_convert.py [--out DIR] [--work DIR] [--layers 2]

  inmemory  one MiniMax-M2.5-sized BF16 layer (256 experts, 3072 x 1536, 7.2 GB) in pinned host
            memory: host-to-device copy from pinned and from pageable memory, FP8 block quantisation
            and the TP4 layouts of both profiles on the GPU, device-to-host of the result; GB/s of
            each against the device's own copy bandwidth
  e2e       a synthetic real-size checkpoint on disk (BF16, --layers layers; and FP8), converted with
            --device cuda and --device cpu: wall times, and the two outputs' sha256 must be equal
            (the GPU path is bit-identical to the CPU one)
Prints a short table last; results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cuda_timing import median_ms  # noqa: E402
from mm_convert.model import ModelShape  # noqa: E402
from mm_convert.plan.parallel import ParallelShape  # noqa: E402
from mm_convert.transform.profiles import PROFILES, Down, GateUp  # noqa: E402
from mm_convert.transform.quant import quantize_fp8_block  # noqa: E402

REAL = ModelShape(hidden_size=3072, intermediate_size=1536, num_layers=1, num_experts=256, top_k=8,
                  num_attention_heads=48, num_key_value_heads=8, head_dim=128, vocab_size=4096)
RESULTS: dict = {}


def part_inmemory() -> None:
    e, h, i = REAL.num_experts, REAL.hidden_size, REAL.intermediate_size
    g = torch.Generator(device="cuda").manual_seed(0)
    layer = {p: torch.empty((e, *s), dtype=torch.bfloat16, pin_memory=True)
             for p, s in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i)))}
    for p, t in layer.items():
        for c in range(0, e, 32):
            t[c:c + 32].copy_((torch.randn((32, *t.shape[1:]), generator=g, device="cuda") * 0.02).to(torch.bfloat16))
    nbytes = sum(t.numel() * 2 for t in layer.values())
    dev = {p: torch.empty_like(t, device="cuda") for p, t in layer.items()}
    pageable = layer["w1"].clone()  # not pinned
    h2d_pinned = median_ms(lambda: [dev[p].copy_(layer[p], non_blocking=True) for p in layer], warmup=1, reps=5)
    h2d_pageable = median_ms(lambda: dev["w1"].copy_(pageable), warmup=1, reps=3)
    copy_ms = median_ms(lambda: dev["w3"].copy_(dev["w1"]))

    def quantise_all():
        return {p: quantize_fp8_block(dev[p]) for p in dev}

    q_ms = median_ms(quantise_all)
    quantised = quantise_all()
    parallel = ParallelShape(4, 1)
    rows = []
    for profile in ("sglang", "trtllm"):
        prof = PROFILES[profile]

        def layout():
            outs = []
            for geo in parallel.ranks(REAL):
                (w1, s1), (w3, s3), (w2, s2) = quantised["w1"], quantised["w3"], quantised["w2"]
                outs.append(prof.pack_gate_up(GateUp(w1, w3, s1, s3), geo))
                outs.append(prof.pack_down(Down(w2, s2), geo))
            return outs

        lay_ms = median_ms(layout)
        outs = layout()
        host = [torch.empty(o.weight.shape, dtype=torch.uint8, pin_memory=True) for o in outs]
        d2h_ms = median_ms(lambda: [hb.copy_(o.weight.view(torch.uint8), non_blocking=True) for hb, o in zip(host, outs)])
        out_bytes = sum(o.weight.numel() for o in outs)
        rows.append({"profile": profile, "layout_ms": round(lay_ms, 2), "d2h_pinned_ms": round(d2h_ms, 2),
                     "output_gb": round(out_bytes / 1e9, 2)})
    RESULTS["inmemory"] = {
        "layer_bf16_gb": round(nbytes / 1e9, 2),
        "h2d_pinned_gbps": round(nbytes / h2d_pinned / 1e6, 1),
        "h2d_pageable_gbps": round(layer["w1"].numel() * 2 / h2d_pageable / 1e6, 1),
        "device_copy_gbps": round(2 * dev["w1"].numel() * 2 / copy_ms / 1e6, 1),
        "quantise_ms": round(q_ms, 2),
        "quantise_gbps_bf16_in": round(nbytes / q_ms / 1e6, 1),
        "h2d_pinned_ms": round(h2d_pinned, 2),
        "layouts": rows,
    }
    print("inmemory", json.dumps(RESULTS["inmemory"]), flush=True)


def _hashes(folder: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in json.loads((folder / "mm_convert.json").read_text())["files"]}


def part_e2e(work: Path, layers: int) -> None:
    from mm_convert.read.tiny import REAL_LAYER, make_synthetic

    runs = []
    for dtype, profile in (("bf16", "sglang"), ("fp8", "trtllm")):
        src = work / f"e2e-{dtype}-{layers}L"
        if not (src / "config.json").exists():
            t0 = time.monotonic()
            make_synthetic(src, replace(REAL_LAYER, num_layers=layers, num_shards=2 * layers + 1), dtype, seed=0,
                           device="cuda")
            print(f"made {src} in {time.monotonic() - t0:.0f} s", flush=True)
        hashes = {}
        for device in ("cuda", "cpu"):
            out = work / f"e2e-out-{dtype}-{device}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "mm_convert.cli", "convert", str(src), str(out), "--tp", "4",
                                   "--profile", profile, "--device", device, "--quiet"],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            wall = time.monotonic() - t0
            if proc.returncode:
                runs.append({"dtype": dtype, "device": device, "error": proc.stderr[-800:]})
                continue
            hashes[device] = _hashes(out)
            runs.append({"dtype": dtype, "profile": profile, "device": device, "wall_s": round(wall, 1),
                         "source_gb": round(sum(p.stat().st_size for p in src.iterdir()) / 1e9, 2)})
            print("e2e", json.dumps(runs[-1]), flush=True)
            if device == "cpu":
                shutil.rmtree(work / f"e2e-out-{dtype}-cuda", ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
        if len(hashes) == 2:
            runs.append({"dtype": dtype, "identical": hashes["cuda"] == hashes["cpu"], "files": len(hashes["cpu"])})
            print("e2e", json.dumps(runs[-1]), flush=True)
    RESULTS["e2e"] = runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-out")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmc-gpu-convert"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--parts", default="inmemory,e2e")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS["gpu"] = torch.cuda.get_device_name()
    for part in args.parts.split(","):
        t0 = time.monotonic()
        try:
            part_inmemory() if part == "inmemory" else part_e2e(args.work, args.layers)
        except Exception as exc:  # noqa: BLE001 - report and go on
            import traceback

            traceback.print_exc()
            RESULTS.setdefault("errors", {})[part] = f"{type(exc).__name__}: {exc}"
        RESULTS.setdefault("seconds", {})[part] = round(time.monotonic() - t0, 1)
        (args.out / "convert_results.json").write_text(json.dumps(RESULTS, indent=2))
    m = RESULTS.get("inmemory")
    print("\n=== GPU conversion path ===")
    if m:
        print(f"real-size BF16 layer {m['layer_bf16_gb']} GB: H2D pinned {m['h2d_pinned_gbps']} GB/s "
              f"({m['h2d_pinned_ms']} ms), pageable {m['h2d_pageable_gbps']} GB/s; device copy {m['device_copy_gbps']} GB/s")
        print(f"quantise on GPU: {m['quantise_ms']} ms = {m['quantise_gbps_bf16_in']} GB/s of BF16 in")
        for r in m["layouts"]:
            print(f"  TP4 {r['profile']} layout, 4 ranks: {r['layout_ms']} ms; D2H pinned {r['d2h_pinned_ms']} ms "
                  f"for {r['output_gb']} GB")
    for r in RESULTS.get("e2e", []):
        print("e2e", r)
    for k, v in RESULTS.get("errors", {}).items():
        print("ERROR", k, v)


if __name__ == "__main__":
    main()
