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


# -- presharded folders ------------------------------------------------------------------------------


def _presharded(out: Path) -> Path:
    (root,) = [p for p in out.iterdir() if p.name.startswith("presharded-")]
    (folder,) = list(root.iterdir())
    return folder


def presharded_tensor(out: Path, rank: int, name: str) -> torch.Tensor:
    folder = _presharded(out)
    plan = json.loads((folder / "checksum.json").read_text())
    read = next(r for r in plan["rank_to_reads"][str(rank)] if r["name"] == name)
    with safe_open(str(folder / read["filename"]), framework="pt") as f:
        return f.get_tensor(read["stored_key"])


def presharded_edit(out: Path, rank: int, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace what `rank` reads as `name`, keeping the folder self-consistent: the new content is
    stored under its own content hash in a new file, checksum.json and the rank's checksum are
    recomputed with SGLang's rules, and the manifest is forged. Only a check against the source
    (or SGLang's post-processing) can tell."""
    from mm_convert.plan import presharded

    folder = _presharded(out)
    plan = json.loads((folder / "checksum.json").read_text())
    new = change(presharded_tensor(out, rank, name)).contiguous()
    h = presharded.content_hasher(str(new.dtype), new.shape)
    h.update(new.reshape(-1).view(torch.uint8).numpy().tobytes())
    key, filename = h.hexdigest(), "model-99999-rank-edited.safetensor"
    save_file({key: new}, str(folder / filename))
    plan["files"].append({"filename": filename, "writer_rank": rank, "rank_list": [rank], "is_common": False,
                          "tensors": [{"stored_key": key, "size": new.numel() * new.element_size(),
                                       "rank_to_names": {str(rank): [name]}}]})
    reads = plan["rank_to_reads"][str(rank)]
    for r in reads:
        if r["name"] == name:
            r["filename"], r["stored_key"] = filename, key
    plan["rank_checksums"][str(rank)] = presharded.rank_checksum((r["name"], r["stored_key"]) for r in reads)
    (folder / "checksum.json").write_text(json.dumps(plan, indent=2))
    manifest_path = out / "mm_convert.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"path": str((folder / filename).relative_to(out)), "size": 0, "sha256": ""})
    manifest_path.write_text(json.dumps(manifest, indent=2))
    forge_manifest(out)


def swapped_halves(w: torch.Tensor, local_expert: int, padded: int) -> torch.Tensor:
    w = w.view(torch.uint8).clone()
    up, gate = w[local_expert, :padded].clone(), w[local_expert, padded:].clone()
    w[local_expert, :padded], w[local_expert, padded:] = gate, up
    return w.view(torch.float8_e4m3fn)
