"""The model card (`README.md`) of a converted checkpoint: metadata and text from the manifest.

Everything it says is read from `config.json` and `mm_convert.json`, so it cannot drift from what
is in the folder: the source and revision, what was done to the weights, the shapes with the exact
serving flags, the validation table as recorded, and the command that reproduces it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convert import model, output_format
from convert.fsutil import FileRecord, atomic_write_bytes, read_json_object, sha256_file
from convert.manifest import Manifest
from convert.output_format import ConfigBlock
from convert.tiny import SYNTHETIC_KEY


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def _metadata(manifest: Manifest, base_model: str | None, license_id: str | None) -> str:
    lines = ["---"]
    if base_model:
        lines += [f"base_model: {_yaml_str(base_model)}", "base_model_relation: quantized"]
    if license_id:
        lines.append(f"license: {_yaml_str(license_id)}")
    else:
        lines += ["license: other", "license_name: see-source-repository"]
    lines += [
        "library_name: sglang",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {t}" for t in ("fp8", "mixture-of-experts", "minimax_m2", "flashinfer", "trtllm-routed-moe",
                             "sglang", "mm-convert", f"profile-{manifest.profile}")),
        "---",
    ]
    return "\n".join(lines)


def _validation_table(manifest: Manifest) -> list[str]:
    if not manifest.validation:
        return ["Not validated yet: run `mm-convert validate OUT --source SOURCE --record` before publishing."]
    out = []
    for shape, summary in sorted(manifest.validation.items()):
        checks = summary.get("checks", {})
        verdict = "passed" if summary.get("passed") else "INCOMPLETE" if summary.get("incomplete") else "FAILED"
        counts = ", ".join(f"{c}: {v.get('pass', 0)} pass / {v.get('fail', 0)} fail" for c, v in sorted(checks.items()))
        out.append(f"**{shape}: {verdict}** ({counts}; "
                   f"{'checked against the source' if summary.get('source_checked') else 'without the source'}; "
                   f"kernel `{summary.get('kernel')}`, {summary.get('tokens')} tokens per layer).")
        if summary.get("kernel_note"):
            out.append(f"Kernel selection: {summary['kernel_note']}.")
        for line in summary.get("not_run") or []:
            out.append(f"Not run: `{line}`" + (" (allowed by --allow-skip)." if summary.get("allow_skip") else "."))
        rows = summary.get("kernel_rows") or []
        if rows:
            out += ["", "| shape | layer | rel L2 | cosine | max abs | in FlashInfer tolerance | status |", "|---|---|---|---|---|---|---|"]
            out += [f"| {r['shape']} | {r['layer']} | {r['rel_l2']:.2e} | {r['cosine']:.6f} | {r['max_abs']:.2e} | "
                    f"{r['within_tolerance']:.3f} | {r['status']} |" for r in rows]
        out.append("")
    return out


def _title(config: dict, block: ConfigBlock, base: str | None) -> str:
    shapes = ", ".join(s.label for s in block.shapes)
    name = base.split("/")[-1] if base else ("Synthetic tiny MiniMax-M2" if SYNTHETIC_KEY in config else "MiniMax-M2")
    if block.format == "presharded":
        return f"{name}, FP8, presharded for SGLang with the routed TRT-LLM MoE kernel ({shapes})"
    return f"{name}, FP8 experts laid out for the routed TRT-LLM MoE kernel ({block.profile} profile; {shapes})"


def _weights_sentence(block: ConfigBlock) -> str:
    if block.source_kind == "fp8":
        return "The routed experts were FP8 (e4m3, 128x128 block scales) in the source and were carried over byte for byte."
    return ("The routed experts were BF16 in the source and were quantised to FP8 e4m3 with 128x128 block scales "
            "(FlashInfer's rule: scale = amax/448 per block); attention, norms, router and embeddings keep their dtype.")


def _layout_sentence(profile: str) -> str:
    if profile == "sglang":
        return ("gate/up rows as `[up (w3); gate (w1)]`, the rank's 128-padded slice of the intermediate dimension, "
                "zero padding; MajorK, unshuffled (byte-identical to what SGLang's loader builds)")
    return "the sglang layout plus TRT-LLM's row shuffle (epilogue tile 64) and BlockMajorK (128) on the weights"


def _presharded_sections(block: ConfigBlock) -> list[str]:
    from convert.presharded import launch_command
    from convert.sglang_state import GPU_ARCH_NAMES

    lines = [
        "## What was done to the weights",
        "",
        f"- {_weights_sentence(block)}",
        "- Every rank's whole state is stored as SGLang 0.5.23 holds it after loading (`--load-format presharded`): "
        "attention `qkv_proj` merged from the rank's q, k and v rows, `o_proj` the rank's columns, q/k norms per rank, "
        "the embedding and lm_head padded and split by rows, norms, router and correction bias replicated; "
        f"experts in the `{block.profile}` profile ({_layout_sentence(block.profile)}).",
        "- For Blackwell (`sm100`) the FP8 linear layers are stored as SGLang's DeepGEMM post-processing leaves them: "
        "weights re-quantised with power-of-two block scales, scales packed as UE8M0 int32. For Hopper (`sm90`) they "
        "are the source bytes.",
        "- Each tensor is stored once under its content hash; `checksum.json` says which file and key every rank "
        "reads and holds each rank's checksum; `READY` marks the folder complete.",
        "",
        "## Serving with SGLang",
        "",
        "The folder holds no standard weight shards on purpose: SGLang loads it only with `--load-format presharded` and "
        "the `presharded_path` below, and any other load fails at once instead of serving uninitialised experts. "
        f"The folder key does not record the MoE backend, so serve it with `--moe-runner-backend {block.moe_runner_backend}` "
        "only (another backend would read the gate/up halves in the wrong order).",
        "",
        "| shape | GPU | SGLang | ranks | files | folder |",
        "|---|---|---|---|---|---|",
    ]
    for s in block.shapes:
        ranks = "all" if s.ranks is None else ",".join(map(str, s.ranks))
        lines.append(f"| {s.parallel.label} | {GPU_ARCH_NAMES.get(s.gpu_arch or '', s.gpu_arch)} | {s.sglang_version} | "
                     f"{ranks} | {s.data_files} | `{s.dir}` |")
    lines += ["", "```bash", "MODEL=/path/to/this/folder  # where this repository was downloaded"]
    for s in block.shapes:
        lines.append(launch_command("MODEL", s.tp, s.ep, s.dir.split("/")[0], block.moe_runner_backend, shell_variable=True))
    lines += ["```", ""]
    return lines


def _experts_sections(block: ConfigBlock) -> list[str]:
    lines = [
        "## What was done to the weights",
        "",
        f"- {_weights_sentence(block)}",
        "- Non-expert tensors (attention, norms, router, embeddings, lm_head) are unchanged, in standard shards "
        "(`model-*.safetensors` + `model.safetensors.index.json`).",
        f"- Each rank's experts are stored kernel-ready under `experts/tp{{T}}-ep{{E}}/rank-{{r}}-part-{{p}}.safetensors`, "
        f"profile `{block.profile}`: {_layout_sentence(block.profile)}.",
        f"- Kernel flags: `use_shuffled_weight={block.use_shuffled_weight}`, `weight_layout={block.weight_layout}`.",
        "",
        "## Parallel shapes and serving flags",
        "",
        "| shape | moe_tp | ep | experts per rank | I_p (padded) | parts per rank | SGLang flags |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in block.shapes:
        flags = f"`--tp-size {s.tp} --ep-size {s.ep} --moe-runner-backend {block.moe_runner_backend}`"
        lines.append(f"| `{s.dir}` | {s.moe_tp} | {s.ep} | {s.experts_per_rank} | {s.padded_intermediate_size} | "
                     f"{s.parts_per_rank} | {flags} |")
    lines += [
        "",
        "The per-rank expert files hold exactly the `w13_weight`, `w13_weight_scale_inv`, `w2_weight` and "
        "`w2_weight_scale_inv` buffers of each rank; they are meant to be loaded into those buffers directly. "
        "SGLang does not read them: for SGLang, convert with `--format presharded` (the default for the sglang profile).",
        "",
    ]
    return lines


def _convert_command(block: ConfigBlock, s) -> str:
    if s.format == "presharded":
        ranks = "" if s.ranks is None else f" --ranks {','.join(map(str, s.ranks))}"
        return f"mm-convert convert SOURCE OUT --tp {s.tp} --ep {s.ep} --gpu-arch {s.gpu_arch}{ranks}"
    fmt = "" if output_format.default_format(block.profile) == "experts" else " --format experts"
    return f"mm-convert convert SOURCE OUT{fmt} --profile {block.profile} --tp {s.tp} --ep {s.ep}"


def render_card(config: dict, manifest: Manifest, license_id: str | None = None) -> str:
    """The card's text. It names no Hub repo of its own, so the published card is the local one."""
    block = ConfigBlock.from_dict(config[output_format.CONFIG_BLOCK_KEY])
    src = manifest.source
    base, origin = _origin(config, src)
    title = _title(config, block, base)
    others = [f for f in manifest.files if f.path != output_format.MODEL_CARD_NAME]
    what = ("every rank's state pre-sharded for SGLang's `--load-format presharded`" if block.format == "presharded"
            else "its routed experts pre-laid-out")
    lines = [
        _metadata(manifest, base, license_id),
        "",
        f"# {title}",
        "",
        f"{origin}, with {what} for FlashInfer's TRT-LLM routed FP8 MoE kernel "
        f"(`{block.kernel}`), the kernel SGLang runs with `--moe-runner-backend {block.moe_runner_backend}`. "
        f"Made with mm-convert {manifest.tool_version}.",
        "",
        *(_presharded_sections(block) if block.format == "presharded" else _experts_sections(block)),
        "## Validation",
        "",
        *_validation_table(manifest),
        "## Files",
        "",
        f"{len(others) + 2} files (this card and `{output_format.MANIFEST_NAME}` included), "
        f"{sum(f.size for f in others) / 1e9:.2f} GB; `{output_format.MANIFEST_NAME}` lists every file's size and "
        "sha256 and the tensor census.",
        "",
        "## Reproduce",
        "",
        "```bash",
        *([f"mm-convert download {src.repo_id} SOURCE --revision {src.revision}"] if src.repo_id else
          [f"mm-convert make-tiny SOURCE --dtype {config[SYNTHETIC_KEY].get('dtype')} --seed {config[SYNTHETIC_KEY].get('seed')}"]
          if SYNTHETIC_KEY in config else [f"# SOURCE: the local folder {src.path}"]),
        *(_convert_command(block, s) for s in block.shapes),
        "mm-convert validate OUT --source SOURCE --record",
        "```",
        "",
        "Without a Blackwell GPU the validation runs mm-convert's own Triton routed FP8 MoE (or its torch reference); "
        "the kernel named above needs SM100/SM103.",
        "",
    ]
    return "\n".join(lines)


def _origin(config: dict, src) -> tuple[str | None, str]:
    """(base_model for the metadata, the sentence saying where the weights come from)."""
    if src.repo_id:
        return src.repo_id, (f"[{src.repo_id}](https://huggingface.co/{src.repo_id}) at revision `{src.revision}`")
    if SYNTHETIC_KEY in config:
        return None, ("A synthetic, randomly initialised MiniMax-M2-shaped checkpoint made by `mm-convert make-tiny` "
                      "(not a trained model: for tests and demonstrations only)")
    shape = model.read_model_shape(config)
    if (shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_experts) == (3072, 1536, 62, 256):
        return model.BASE_MODEL_REPO, (f"A local copy of a MiniMax-M2.5-shaped checkpoint (`{src.path}`, no Hub "
                                       f"revision recorded; assumed to be {model.BASE_MODEL_REPO} or a derivative)")
    return None, f"A MiniMax-M2-architecture checkpoint from the local folder `{src.path}`"


def write_card(out: Path, manifest: Manifest) -> None:
    """(Re)write OUT/README.md from config + manifest and keep the manifest's record of it current."""
    config = read_json_object(out / output_format.CONFIG_NAME)
    license_id = license_from_source(Path(manifest.source.path)) if manifest.source.path else None
    path = out / output_format.MODEL_CARD_NAME
    atomic_write_bytes(path, render_card(config, manifest, license_id).encode())
    rec = FileRecord(output_format.MODEL_CARD_NAME, path.stat().st_size, sha256_file(path))
    manifest.files = [f for f in manifest.files if f.path != rec.path] + [rec]
    manifest.save(out)


def license_from_source(source_dir: Path) -> str | None:
    """The `license:` of the source repository's README front matter, if it has one."""
    readme = source_dir / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "license":
            return value.strip().strip("'\"") or None
    return None


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML front matter as a flat dict (keys and scalar values; lists as lists): for tests."""
    head = text.split("---", 2)[1]
    meta: dict[str, Any] = {}
    key = None
    for line in head.splitlines():
        if line.startswith("- ") and key:
            meta.setdefault(key, []).append(line[2:].strip())
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip()
            if value.strip():
                meta[key] = value.strip().strip('"')
    return meta
