"""The GPU runs of the routed-MoE kernel issue, in one process (see bench/gpu_run.sh).

Parts (all by default; `--parts` picks some):
  env       versions, GPU, measured ceilings (bf16 matmul TFLOP/s, device copy GB/s)
  tiny      validate tiny conversions (TP1, TP4, TEP4; both profiles; FP8 and BF16 sources)
            with --kernel triton and --kernel reference, and show why trtllm/cutlass skip
  sweep     correctness at real per-rank shapes: tokens 1..8192, both profiles, TP1/TP4/TEP4/TP8
            per-rank tensors (zero-filled ranks included), Triton vs the float32 reference
  perf      Triton kernel time (CUDA events, median after warm-up), TFLOP/s and GB/s
  realsize  a synthetic checkpoint with MiniMax-M2.5's real layer shapes (2 layers, FP8),
            converted for TP4 and TEP4, every rank validated with triton and reference
Writes results.json under --out and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
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
from mm_convert.validators import kernel_check  # noqa: E402
from mm_convert.validators.kernels.base import RankWeights  # noqa: E402
from mm_convert.validators.kernels.reference import ReferenceBackend  # noqa: E402
from mm_convert.validators.numerics import FP8_KERNEL, compare_outputs, passes  # noqa: E402
from mm_convert.validators.routing import route, unpack_topk  # noqa: E402

REAL = ModelShape(hidden_size=3072, intermediate_size=1536, num_layers=2, num_experts=256, top_k=8,
                  num_attention_heads=48, num_key_value_heads=8, head_dim=128, vocab_size=4096)
RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


# -- env ----------------------------------------------------------------------------------------


def part_env():
    import triton

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
        "cpus": os.cpu_count(),
    }
    try:
        import flashinfer

        env["flashinfer"] = flashinfer.__version__
    except Exception as exc:  # noqa: BLE001 - report whatever stops the import
        env["flashinfer"] = f"not importable: {type(exc).__name__}: {exc}"
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        env["driver"] = "?"
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, warmup=3, reps=10)
    env["bf16_matmul_tflops"] = round(2 * n**3 / ms / 1e9, 1)
    x = torch.empty(4 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), warmup=2, reps=10)
    env["copy_gbps"] = round(2 * x.numel() / ms / 1e6, 1)  # bytes read + written
    RESULTS["env"] = env
    log("env", json.dumps(env))


# -- tiny -----------------------------------------------------------------------------------------


def part_tiny(work: Path):
    from mm_convert.commands.convert import ConvertOptions, convert
    from mm_convert.read.tiny import TINY, make_synthetic
    from mm_convert.validators.kernels.select import select
    from mm_convert.validators.run import validate

    rows = []
    for dtype in ("fp8", "bf16"):
        src = work / f"tiny-{dtype}"
        if not src.exists():
            make_synthetic(src, TINY, dtype, seed=0)
        for profile in ("sglang", "trtllm"):
            for tp, ep in ((1, 1), (4, 1), (4, 4)):
                out = work / f"tiny-{dtype}-{profile}-tp{tp}-ep{ep}"
                if not out.exists():
                    convert(src, out, ConvertOptions(profile=profile, format="experts", tp=tp, ep=ep, quiet=True))
                for kernel in ("triton", "reference"):
                    t0 = time.monotonic()
                    rep = validate(out, src, kernel=kernel, layers=[0, 1, 2], tokens=64, device="cuda")
                    k = rep.kernel_rows()
                    rows.append({"dtype": dtype, "profile": profile, "tp": tp, "ep": ep, "kernel": kernel,
                                 "passed": rep.passed, "checks": {c: dict(v) for c, v in rep.by_check().items()},
                                 "max_rel_l2": max(r.metrics["rel_l2"] for r in k) if k else None,
                                 "min_in_tol": min(r.metrics["within_tolerance"] for r in k) if k else None,
                                 "seconds": round(time.monotonic() - t0, 2)})
                    log("tiny", json.dumps(rows[-1]))
    flags = PROFILES["sglang"].flags
    RESULTS["tiny"] = {
        "rows": rows,
        "auto_note": select("auto", flags).note,
        "trtllm_note": select("trtllm", flags).note,
        "cutlass_note": select("cutlass", flags).note,
        "cutlass_trtllm_profile_note": select("cutlass", PROFILES["trtllm"].flags).note,
    }
    log("tiny notes", json.dumps({k: v for k, v in RESULTS["tiny"].items() if k != "rows"}))


# -- real per-rank tensors in memory ---------------------------------------------------------------


def real_layer(seed: int = 0):
    """One real-size layer of source experts, drawn and block-quantised on the GPU (~3.6 GB FP8)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    e, h, i = REAL.num_experts, REAL.hidden_size, REAL.intermediate_size
    out = {}
    for proj, shape in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
        qs, ss = [], []
        for chunk in range(0, e, 32):
            w = (torch.randn((32, *shape), generator=g, device="cuda") * 0.02).to(torch.bfloat16)
            q, s = quantize_fp8_block(w)
            qs.append(q.view(torch.uint8))
            ss.append(s)
        out[proj] = (torch.cat(qs), torch.cat(ss))
    gate = torch.randn(e, h, generator=g, device="cuda") * 0.05
    bias = torch.randn(e, generator=g, device="cuda") * 0.05
    return out, gate, bias


def rank_weights_for(src, parallel: ParallelShape, rank: int, profile_name: str) -> RankWeights:
    profile = PROFILES[profile_name]
    geo = parallel.rank(REAL, rank)
    sl = slice(geo.first_expert, geo.first_expert + geo.num_local_experts)
    gu = profile.pack_gate_up(GateUp(src["w1"][0][sl], src["w3"][0][sl], src["w1"][1][sl], src["w3"][1][sl]), geo)
    dn = profile.pack_down(Down(src["w2"][0][sl], src["w2"][1][sl]), geo)
    return RankWeights(gu.weight.view(torch.float8_e4m3fn), gu.scale, dn.weight.view(torch.float8_e4m3fn), dn.scale,
                       profile.flags.use_shuffled_weight, profile.flags.weight_layout, geo.first_expert,
                       geo.num_local_experts, geo.padded_intermediate_size, REAL.hidden_size)


def inputs_for(tokens: int, gate, bias, seed: int):
    hidden = torch.randn(tokens, REAL.hidden_size, generator=torch.Generator().manual_seed(seed)).cuda()
    routing = route(hidden, gate, bias, REAL.top_k)
    return kernel_check.make_inputs(hidden, routing, REAL.num_experts)


RANK_CASES = [  # (label, tp, ep, rank)
    ("TP1", 1, 1, 0), ("TP4 r0", 4, 1, 0), ("TP4 r3", 4, 1, 3), ("TEP4 r0", 4, 4, 0), ("TEP4 r3", 4, 4, 3),
    ("TP8 r5", 8, 1, 5), ("TP8 r7 (zero)", 8, 1, 7),
]


def part_sweep():
    from mm_convert.validators.kernels.triton_moe import TritonBackend

    src, gate, bias = real_layer(0)
    tri, ref = TritonBackend("cuda"), ReferenceBackend("cuda")
    rows = []
    for profile in ("sglang", "trtllm"):
        for label, tp, ep, rank in RANK_CASES:
            w = rank_weights_for(src, ParallelShape(tp, ep), rank, profile)
            for tokens in (1, 7, 64, 512, 2048, 8192):
                inputs = inputs_for(tokens, gate, bias, seed=tokens)
                a = torch.full((tokens, REAL.hidden_size), float("nan"), device="cuda")
                b = torch.full_like(a, float("nan"))
                tri.run(inputs, w, a)
                ref.run(inputs, w, b)
                torch.cuda.synchronize()
                m = compare_outputs(a, b)
                nan = int(torch.isnan(a).sum())
                zero_ok = bool((a == 0).all()) if "zero" in label else None
                ok = (nan == 0) and (passes(m, FP8_KERNEL) if m["ref_rms"] > 0 else bool((a == 0).all()))
                rows.append({"profile": profile, "case": label, "tokens": tokens, "nan": nan, "zero_ok": zero_ok,
                             "ok": ok, **{k: m[k] for k in ("rel_l2", "cosine", "max_abs", "within_tolerance", "ref_rms")}})
                log("sweep", json.dumps(rows[-1]))
    RESULTS["sweep"] = rows


def part_perf():
    from mm_convert.validators.kernels.triton_moe import TritonBackend

    src, gate, bias = real_layer(1)
    tri = TritonBackend("cuda")
    rows = []
    for profile in ("sglang", "trtllm"):
        for label, tp, ep, rank in (("TP4 r0", 4, 1, 0), ("TEP4 r0", 4, 4, 0), ("TP1", 1, 1, 0)):
            w = rank_weights_for(src, ParallelShape(tp, ep), rank, profile)
            for tokens in (1, 16, 128, 1024, 8192):
                inputs = inputs_for(tokens, gate, bias, seed=100 + tokens)
                out = torch.empty((tokens, REAL.hidden_size), device="cuda")
                ms_total = median_ms(lambda: tri.run(inputs, w, out), warmup=3, reps=20)
                prepared = tri.prepare(inputs, w)
                ms = median_ms(lambda: tri.launch(inputs, w, prepared), warmup=3, reps=30)
                ids, _ = unpack_topk(inputs.topk_packed)
                local = ids - w.local_expert_offset
                mask = (local >= 0) & (local < w.local_num_experts)
                pairs = int(mask.sum())
                touched = int(torch.unique(local[mask]).numel())
                h, ip = w.hidden_size, w.padded_intermediate_size
                flops = 6 * pairs * h * ip
                weight_bytes = touched * 3 * h * ip + touched * 4 * (3 * (h // 128) * (ip // 128))
                act_bytes = tokens * h + pairs * ip * 2 + pairs * h * 4 * 2 + tokens * h * 4
                rows.append({"profile": profile, "case": label, "tokens": tokens, "ms": round(ms, 4),
                             "ms_with_host_prep": round(ms_total, 4),
                             "routed_pairs": pairs, "experts_touched": touched,
                             "tflops": round(flops / ms / 1e9, 2), "weight_gbps": round(weight_bytes / ms / 1e6, 1),
                             "total_gbps": round((weight_bytes + act_bytes) / ms / 1e6, 1)})
                log("perf", json.dumps(rows[-1]))
    RESULTS["perf"] = rows


def part_tune():
    """A few launch configurations at both ends of the token range (TP4 rank 0, sglang)."""
    from mm_convert.validators.kernels.triton_moe import TritonBackend

    src, gate, bias = real_layer(2)
    w = rank_weights_for(src, ParallelShape(4, 1), 0, "sglang")
    rows = []
    for tokens in (16, 1024, 8192):
        inputs = inputs_for(tokens, gate, bias, seed=7 + tokens)
        for block_m in (16, 32, 64, 128):
            for warps, stages in ((4, 3), (4, 4), (8, 3), (8, 4)):
                tri = TritonBackend("cuda", block_m=block_m, num_warps=warps, num_stages=stages)
                try:
                    prepared = tri.prepare(inputs, w)
                    ms = median_ms(lambda: tri.launch(inputs, w, prepared), warmup=2, reps=15)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    rows.append({"tokens": tokens, "block_m": block_m, "warps": warps, "stages": stages,
                                 "error": f"{type(exc).__name__}"})
                    continue
                rows.append({"tokens": tokens, "block_m": block_m, "warps": warps, "stages": stages, "ms": round(ms, 4)})
                log("tune", json.dumps(rows[-1]))
    RESULTS["tune"] = rows


# -- real size, end to end ------------------------------------------------------------------------


def part_realsize(work: Path):
    from mm_convert.commands.convert import ConvertOptions, convert
    from mm_convert.read.tiny import REAL_LAYER, make_synthetic
    from mm_convert.validators.run import validate

    src = work / "real-fp8"
    t0 = time.monotonic()
    if not src.exists():
        make_synthetic(src, replace(REAL_LAYER, num_layers=2, num_shards=0), "fp8", seed=0, device="cuda")
    rows = {"make_seconds": round(time.monotonic() - t0, 1), "runs": []}
    for profile, tp, ep in (("sglang", 4, 1), ("trtllm", 4, 4)):
        out = work / f"real-{profile}-tp{tp}-ep{ep}"
        t0 = time.monotonic()
        convert(src, out, ConvertOptions(profile=profile, format="experts", tp=tp, ep=ep, quiet=True))
        conv = time.monotonic() - t0
        for kernel in ("triton", "reference"):
            t0 = time.monotonic()
            rep = validate(out, src, kernel=kernel, layers=[0, 1], tokens=256, device="cuda", checks=("kernel",))
            k = rep.kernel_rows()
            rows["runs"].append({"profile": profile, "tp": tp, "ep": ep, "kernel": kernel, "passed": rep.passed,
                                 "convert_seconds": round(conv, 1), "validate_seconds": round(time.monotonic() - t0, 1),
                                 "per_layer_seconds": [r.metrics["seconds"] for r in k],
                                 "rel_l2": [r.metrics["rel_l2"] for r in k], "cosine": [r.metrics["cosine"] for r in k],
                                 "within_tolerance": [r.metrics["within_tolerance"] for r in k]})
            log("realsize", json.dumps(rows["runs"][-1]))
        RESULTS["realsize"] = rows
    # One full validation (manifest hashes, structure, padding, exactness, kernel) at real size.
    out = work / "real-sglang-tp4-ep1"
    t0 = time.monotonic()
    rep = validate(out, src, kernel="auto", layers=[0, 1], tokens=256, device="cuda")
    rows["full_validate"] = {"passed": rep.passed, "kernel": rep.kernel_used, "seconds": dict(rep.seconds),
                             "total_seconds": round(time.monotonic() - t0, 1),
                             "checks": {c: dict(v) for c, v in rep.by_check().items()}}
    log("realsize full", json.dumps(rows["full_validate"]))
    RESULTS["realsize"] = rows


def summary() -> str:
    lines = ["", "=== summary ==="]
    env = RESULTS.get("env", {})
    if env:
        lines.append(f"{env['gpu']} sm{env['capability']} torch {env['torch']} triton {env['triton']} "
                     f"flashinfer {env['flashinfer']}; ceilings: bf16 {env['bf16_matmul_tflops']} TFLOP/s, copy {env['copy_gbps']} GB/s")
    tiny = RESULTS.get("tiny")
    if tiny:
        ok = sum(r["passed"] for r in tiny["rows"])
        worst = max((r["max_rel_l2"] or 0) for r in tiny["rows"] if r["kernel"] == "triton")
        lines.append(f"tiny validate: {ok}/{len(tiny['rows'])} passed; triton worst rel_l2 {worst:.3e}")
        lines.append(f"  auto: {tiny['auto_note']}")
        lines.append(f"  {tiny['trtllm_note']}")
        lines.append(f"  {tiny['cutlass_note']}")
    sweep = RESULTS.get("sweep")
    if sweep:
        ok = sum(r["ok"] for r in sweep)
        real = [r for r in sweep if r["ref_rms"] > 0]
        lines.append(f"sweep: {ok}/{len(sweep)} ok; rel_l2 max {max(r['rel_l2'] for r in real):.3e}, "
                     f"cosine min {min(r['cosine'] for r in real):.5f}, in-tol min {min(r['within_tolerance'] for r in real):.3f}, "
                     f"NaN total {sum(r['nan'] for r in sweep)}")
    perf = RESULTS.get("perf")
    if perf:
        lines.append(f"{'perf':<8}{'case':<9}{'tokens':>7}{'kern ms':>9}{'all ms':>9}{'TFLOP/s':>9}{'w GB/s':>9}")
        for r in perf:
            lines.append(f"{r['profile']:<8}{r['case']:<9}{r['tokens']:>7}{r['ms']:>9.3f}{r['ms_with_host_prep']:>9.3f}"
                         f"{r['tflops']:>9.1f}{r['weight_gbps']:>9.0f}")
    tune = RESULTS.get("tune")
    if tune:
        for tokens in sorted({r["tokens"] for r in tune}):
            ok = [r for r in tune if r["tokens"] == tokens and "ms" in r]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            default = next((r for r in ok if (r["warps"], r["stages"]) == (4, 3)
                            and r["block_m"] == {16: 16, 1024: 32, 8192: 64}.get(tokens)), None)  # the first version
            if best:
                lines.append(f"tune T={tokens}: best block_m {best['block_m']} warps {best['warps']} stages {best['stages']} "
                             f"{best['ms']:.3f} ms (default {default['ms'] if default else '?'} ms)")
    real = RESULTS.get("realsize")
    if real:
        for r in real["runs"]:
            lines.append(f"real {r['profile']} tp{r['tp']} ep{r['ep']} {r['kernel']:<9} pass={r['passed']} "
                         f"rel_l2 {max(r['rel_l2']):.3e} s/layer {r['per_layer_seconds']} convert {r['convert_seconds']}s")
        if "full_validate" in real:
            f = real["full_validate"]
            lines.append(f"real full validate: pass={f['passed']} kernel={f['kernel']} {f['total_seconds']}s {f['seconds']}")
    for name, err in RESULTS.get("errors", {}).items():
        lines.append(f"ERROR in {name}: {err}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-out")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmc-gpu"))
    ap.add_argument("--parts", default="env,tiny,sweep,perf,realsize")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = {"env": part_env, "tiny": lambda: part_tiny(args.work), "sweep": part_sweep, "perf": part_perf, "tune": part_tune,
             "realsize": lambda: part_realsize(args.work)}
    for name in args.parts.split(","):
        t0 = time.monotonic()
        try:
            parts[name]()
        except Exception as exc:  # noqa: BLE001 - keep going, report it
            traceback.print_exc()
            RESULTS.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        RESULTS.setdefault("part_seconds", {})[name] = round(time.monotonic() - t0, 1)
        (args.out / "results.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print(summary())


if __name__ == "__main__":
    main()
