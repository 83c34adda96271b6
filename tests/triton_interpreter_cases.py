"""Run under TRITON_INTERPRET=1 in a subprocess (tests/test_triton_kernel.py): the Triton routed
MoE kernel on tiny per-rank tensors against an independent torch emulation of the same arithmetic.

Prints one JSON line per case.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from mm_convert.transform.profiles import Packed  # noqa: E402
from mm_convert.transform.quant import dequantize_fp8_block  # noqa: E402
from mm_convert.validators import kernel_check  # noqa: E402
from mm_convert.validators.checkpoint import ConvertedCheckpoint  # noqa: E402
from mm_convert.validators.kernels.triton_moe import TritonBackend  # noqa: E402
from mm_convert.validators.numerics import compare_outputs  # noqa: E402
from mm_convert.validators.routing import route, unpack_topk  # noqa: E402


def emulate(inputs, ckpt, entry, g, layer) -> torch.Tensor:
    """The kernel's arithmetic in plain torch: FP8 GEMM1, SwiGLU, FP8 requantised intermediate
    (amax/448 per row per 128 columns), FP8 GEMM2, routing weight, sum over slots, bf16 output."""
    x = inputs.dequantized_hidden()
    ids, weights = unpack_topk(inputs.topk_packed)
    t = ckpt.rank_layer(entry, g.rank, layer)
    gu = ckpt.profile.unpack_gate_up(Packed(t.w13, t.w13_scale), g)
    dn = ckpt.profile.unpack_down(Packed(t.w2, t.w2_scale), g)
    out = torch.zeros_like(x)
    for i, e in enumerate(g.experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0 or g.real_rows == 0:
            continue
        w1 = dequantize_fp8_block(gu.gate[i].view(torch.float8_e4m3fn), gu.gate_scale[i])
        w3 = dequantize_fp8_block(gu.up[i].view(torch.float8_e4m3fn), gu.up_scale[i])
        w2 = dequantize_fp8_block(dn.weight[i].view(torch.float8_e4m3fn), dn.scale[i])
        act = torch.nn.functional.silu(x[tok] @ w1.t()) * (x[tok] @ w3.t())
        pad = -act.shape[1] % 128
        groups = torch.nn.functional.pad(act, (0, pad)).reshape(act.shape[0], -1, 128)
        amax = groups.abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        q = (groups / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
        act_q = q.reshape(act.shape[0], -1)[:, : act.shape[1]]
        out.index_add_(0, tok, (act_q @ w2.t()) * weights[tok, slot, None])
    return out.to(torch.bfloat16).float()


def main(folders: list[str]) -> None:
    backend = TritonBackend("cpu")
    for folder in folders:
        with ConvertedCheckpoint.open(folder) as ckpt:
            entry = ckpt.block.shapes[0]
            layer = 1
            gate, bias = ckpt.router(entry, layer)
            for tokens in (1, 7, 40):
                hidden = kernel_check.hidden_states(tokens, ckpt.shape.hidden_size, 3, layer)
                inputs = kernel_check.make_inputs(hidden, route(hidden, gate, bias, ckpt.shape.top_k), ckpt.shape.num_experts)
                for g in ckpt.ranks(entry):
                    weights = kernel_check.rank_weights(ckpt, entry, g.rank, layer)
                    out = torch.full(hidden.shape, float("nan"))
                    backend.run(inputs, weights, out)
                    want = emulate(inputs, ckpt, entry, g, layer)
                    m = compare_outputs(out, want)
                    print(json.dumps({
                        "folder": folder, "tokens": tokens, "rank": g.rank, "zero_rank": g.real_rows == 0,
                        "nan": int(torch.isnan(out).sum()), "all_zero": bool((out == 0).all()), **m,
                    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
