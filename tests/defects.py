"""Planting defects in a converted checkpoint, and forging the manifest so the hashes still match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def rewrite_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def forge_manifest(out: Path) -> None:
    """Make mm_convert.json agree with whatever is on disk now (a careless or malicious edit)."""
    manifest_path = out / "mm_convert.json"
    manifest = json.loads(manifest_path.read_text())
    kept = []
    for rec in manifest["files"]:
        path = out / rec["path"]
        if path.exists():
            rec["size"] = path.stat().st_size
            rec["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            kept.append(rec)
    manifest["files"] = kept
    manifest_path.write_text(json.dumps(manifest, indent=2))


def swap_gate_up(out: Path, shape: str, rank: int, layer: int, local_expert: int, padded: int) -> None:
    def change(t):
        name = f"model.layers.{layer}.block_sparse_moe.experts.w13_weight"
        w = t[name].view(torch.uint8).clone()
        up, gate = w[local_expert, :padded].clone(), w[local_expert, padded:].clone()
        w[local_expert, :padded], w[local_expert, padded:] = gate, up
        t[name] = w.view(torch.float8_e4m3fn)

    rewrite_tensors(out / f"experts/{shape}/rank-{rank}-part-0.safetensors", change)


def alter_scale_block(out: Path, shape: str, rank: int, layer: int, local_expert: int) -> None:
    def change(t):
        name = f"model.layers.{layer}.block_sparse_moe.experts.w2_weight_scale_inv"
        s = t[name].clone()
        s[local_expert, 1, 0] *= 1.5
        t[name] = s

    rewrite_tensors(out / f"experts/{shape}/rank-{rank}-part-0.safetensors", change)


def shuffle_again(out: Path, shape: str, rank: int, layer: int) -> None:
    """Apply the TRT-LLM row shuffle a second time to a trtllm-profile w13 (BlockMajorK kept)."""
    from flashinfer import shuffle_matrix_a

    def change(t):
        name = f"model.layers.{layer}.block_sparse_moe.experts.w13_weight"
        w = t[name].view(torch.uint8)
        e, kb, m, bk = w.shape
        twice = torch.stack([torch.stack([shuffle_matrix_a(w[i, k], 64) for k in range(kb)]) for i in range(e)])
        t[name] = twice.view(torch.float8_e4m3fn)

    rewrite_tensors(out / f"experts/{shape}/rank-{rank}-part-0.safetensors", change)
