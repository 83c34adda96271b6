"""The model card (`README.md`) of a converted checkpoint: metadata and text from the manifest.

Everything it says is read from `config.json` and `mm_convert.json`, so it cannot drift from what
is in the folder: the source and revision, what was done to the weights, the shapes with the exact
serving flags, the validation table as recorded, and the command that reproduces it.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm_convert import model, output_format
from mm_convert.errors import SourceError
from mm_convert.fsutil import FileRecord, atomic_write_bytes, read_json_object, sha256_file
from mm_convert.write.manifest import Manifest, ValidationSummary
from mm_convert.output_format import ConfigBlock
from mm_convert.output_format import SYNTHETIC_KEY

if TYPE_CHECKING:
    from mm_convert.validators.report import Report


# Model-card metadata the converted card takes over from the source's card, whole: the licence
# (upstream MiniMax: `other` + `license_name: modified-mit` + `license_link`), languages, tags.
CARRIED_METADATA = ("license", "license_name", "license_link", "language", "pipeline_tag", "tags")
# The Hub shows its "Use this model" SGLang and vLLM snippets for `transformers`-tagged text-generation
# models (huggingface.js local-apps.ts); `sglang` is not a library it knows (docs/research/hub-card.md).
LIBRARY_NAME = "transformers"
OUR_TAGS = ("fp8", "mixture-of-experts", "minimax_m2", "flashinfer", "trtllm-routed-moe", "sglang", "mm-convert")


def source_card_metadata(source_dir: Path) -> dict[str, Any]:
    """The carried-over fields of the source's README.md front matter ({} without a card), parsed
    as huggingface_hub parses it; a card whose metadata cannot be parsed is refused, naming it."""
    from huggingface_hub import metadata_load

    readme = source_dir / output_format.MODEL_CARD_NAME
    if not readme.is_file():
        return {}
    try:
        meta = metadata_load(readme) or {}
    except Exception as exc:  # noqa: BLE001 - yaml and ValueError: one line naming the file
        raise SourceError(f"{readme}: its metadata block cannot be parsed ({type(exc).__name__}); "
                           "fix or remove the card (its licence would be carried over)") from None
    out: dict[str, Any] = {}
    for key in CARRIED_METADATA:
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            out[key] = value.strip()
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            out[key] = list(value)
    return out


def _metadata(manifest: Manifest, block: ConfigBlock, base_model: str | None) -> str:
    from huggingface_hub import ModelCardData

    carried = manifest.source.card
    source_tags = carried.get("tags", [])
    tags = list(dict.fromkeys([*(source_tags if isinstance(source_tags, list) else [source_tags]), *OUR_TAGS,
                               f"profile-{manifest.profile}", *(["presharded"] if block.format == "presharded" else [])]))
    licence = {k: carried[k] for k in ("license", "license_name", "license_link") if k in carried}
    data = ModelCardData(
        base_model=base_model,
        # FP8 carried over or BF16 quantised: either way a serving-format variant of the same weights,
        # which the Hub lists under the base model's "Quantizations"
        base_model_relation="quantized" if base_model else None,
        **(licence or {"license": "unknown"}),  # never invented: "unknown" is the Hub's word for it
        language=carried.get("language"),
        library_name=LIBRARY_NAME,
        pipeline_tag=carried.get("pipeline_tag", "text-generation"),
        tags=tags,
    )
    return "---\n" + data.to_yaml() + "\n---"


def _validation_table(manifest: Manifest, chart: bool) -> list[str]:
    if not manifest.validation:
        return ["Not validated yet: run `mm-convert validate OUT --source SOURCE --record` before publishing.", ""]
    out = []
    for shape, summary in sorted(manifest.validation.items()):
        checks = summary.checks
        verdict = "passed" if summary.passed else "INCOMPLETE" if summary.incomplete else "FAILED"
        counts = ", ".join(f"{c}: {v.get('pass', 0)} pass / {v.get('fail', 0)} fail" for c, v in sorted(checks.items()))
        out.append(f"**{shape}: {verdict}** ({counts}; "
                   f"{'checked against the source' if summary.source_checked else 'without the source'}; "
                   f"kernel `{summary.kernel}`, {summary.tokens} tokens per layer).")
        if summary.kernel_note:
            out.append(f"Kernel selection: {summary.kernel_note}.")
        for line in summary.not_run:
            out.append(f"Not run: `{line}`" + (" (allowed by --allow-skip)." if summary.allow_skip else "."))
        rows = summary.kernel_rows
        if rows:
            vs_source = any("vs_source_rel_l2" in r for r in rows)
            out += ["", "Kernel output against a float32 reference computed from the same FP8 weights (does the "
                        "layout compute what it should?)" + ("; and against the unquantised BF16 source weights, same "
                                                              "inputs (what quantisation costs at the layer's output):"
                                                              if vs_source else ":"), ""]
            head = "| shape | layer | rel L2 | cosine | max abs | in FlashInfer tolerance |"
            out += [head + (" rel L2 vs BF16 | cosine vs BF16 |" if vs_source else "") + " status |",
                    "|---" * (head.count("|") - 1 + (2 if vs_source else 0) + 1) + "|"]
            for r in rows:
                extra = (f" {r['vs_source_rel_l2']:.2e} | {r['vs_source_cosine']:.6f} |" if "vs_source_rel_l2" in r
                         else " - | - |" if vs_source else "")
                out.append(f"| {r['shape']} | {r['layer']} | {r['rel_l2']:.2e} | {r['cosine']:.6f} | {r['max_abs']:.2e} | "
                           f"{r['within_tolerance']:.3f} |{extra} {r['status']} |")
        quant = summary.quant_error
        if quant:
            out += ["", f"Quantisation error of the expert weights (dequantised FP8 against the BF16 source, relative L2 "
                        f"per expert matrix): mean {quant['mean_rel_l2']:.4f}, worst {quant['max_rel_l2']:.4f} over "
                        f"{quant['tensors']} matrices (limit {quant['limit']}).", "",
                    "| layer | matrices | mean rel L2 | worst rel L2 |", "|---|---|---|---|"]
            out += [f"| {layer} | {n} | {mean:.4f} | {worst:.4f} |" for layer, n, mean, worst in quant["per_layer"]]
        out.append("")
    if chart:
        out += [f"![Per-layer errors recorded by the validation]({output_format.CHART_NAME})", ""]
    return out


def _chart_series(manifest: Manifest) -> list[tuple[str, list[tuple[int, float]]]]:
    """(name, [(layer, value)]) series worth drawing: per-layer errors of every recorded shape."""
    series = []
    for shape, summary in sorted(manifest.validation.items()):
        rows = summary.kernel_rows
        if any("vs_source_rel_l2" in r for r in rows):
            series.append((f"{shape}: layer output vs BF16 source (rel L2)",
                           [(r["layer"], r["vs_source_rel_l2"]) for r in rows if "vs_source_rel_l2" in r]))
        quant = summary.quant_error
        if quant:
            series.append((f"{shape}: expert weights vs BF16, mean (rel L2)", [(l, m) for l, _, m, _ in quant["per_layer"]]))
        elif rows:
            series.append((f"{shape}: kernel vs FP8 reference (rel L2)", [(r["layer"], r["rel_l2"]) for r in rows]))
    return [(name, points) for name, points in series if points]


def render_chart(manifest: Manifest) -> str | None:
    """A small SVG line chart of the per-layer errors (None when there is nothing to draw)."""
    series = _chart_series(manifest)
    if not series:
        return None
    width, height, left, right, top, bottom = 640, 260, 64, 16, 16, 40 + 16 * len(series)
    layers = sorted({layer for _, pts in series for layer, _ in pts})
    top_value = max(v for _, pts in series for _, v in pts) or 1.0
    scale = 10 ** math.ceil(math.log10(top_value)) if top_value > 0 else 1.0
    scale = next(s for s in (scale / 5, scale / 2, scale) if s >= top_value)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(layer: int) -> float:
        return left + (plot_w * (layers.index(layer) + 0.5) / len(layers))

    def y(value: float) -> float:
        return top + plot_h * (1 - value / scale)

    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>']
    for i in range(5):
        v = scale * i / 4
        parts += [f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + plot_w}" y2="{y(v):.1f}" stroke="#ddd"/>',
                  f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2g}</text>']
    step = max(1, len(layers) // 16)
    for layer in layers[::step]:
        parts.append(f'<text x="{x(layer):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 28}" text-anchor="middle">layer</text>')
    for i, (name, pts) in enumerate(series):
        colour = colours[i % len(colours)]
        path = " ".join(f"{x(layer):.1f},{y(v):.1f}" for layer, v in sorted(pts))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x(layer):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>' for layer, v in pts]
        ly = top + plot_h + 44 + 16 * i
        parts += [f'<rect x="{left}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>',
                  f'<text x="{left + 16}" y="{ly}">{html.escape(name)}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


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
    from mm_convert.transform.profiles import get_profile

    return get_profile(profile).description


def _presharded_sections(block: ConfigBlock) -> list[str]:
    from mm_convert.plan.presharded import launch_command
    from mm_convert.plan.sglang_state import GPU_ARCH_NAMES

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
        *_unchanged_lines(block),
        "",
        "## Deployment",
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
    lines += ["```", "", _HUB_SNIPPET_NOTE, ""]
    return lines


_HUB_SNIPPET_NOTE = ("The Hub's generic \"Use this model\" SGLang and vLLM snippets start a server without these flags; "
                     "on this repository they stop at load time. Use the commands above, on GPUs of the architecture "
                     "in the table.")


def _unchanged_lines(block: ConfigBlock) -> list[str]:
    return [
        "- Not changed: the tokenizer, chat template, generation config, licence and remote-code files (copied byte "
        "for byte); the architecture and every size in `config.json`"
        + ("; a `quantization_config` (fp8, e4m3, 128x128 blocks, dynamic activations) was added because the experts "
           "are FP8 now" if block.source_kind != "fp8" else "") + ".",
    ]


def _experts_sections(block: ConfigBlock) -> list[str]:
    lines = [
        "## What was done to the weights",
        "",
        f"- {_weights_sentence(block)}",
        "- Non-expert tensors (attention, norms, router, embeddings, lm_head) are unchanged, in standard shards "
        "(`model-*.safetensors` + `model.safetensors.index.json`).",
        *_unchanged_lines(block),
        f"- Each rank's experts are stored kernel-ready under `experts/tp{{T}}-ep{{E}}/rank-{{r}}-part-{{p}}.safetensors`, "
        f"profile `{block.profile}`: {_layout_sentence(block.profile)}.",
        f"- Kernel flags: `use_shuffled_weight={block.use_shuffled_weight}`, `weight_layout={block.weight_layout}`.",
        "",
        "## Deployment",
        "",
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
        return f"mm-convert convert \"$SOURCE\" OUT --tp {s.tp} --ep {s.ep} --gpu-arch {s.gpu_arch}{ranks}"
    fmt = "" if output_format.default_format(block.profile) == "experts" else " --format experts"
    return f"mm-convert convert \"$SOURCE\" OUT{fmt} --profile {block.profile} --tp {s.tp} --ep {s.ep}"


def render_card(config: dict, manifest: Manifest, chart: bool = False) -> str:
    """The card's text (`chart`: it shows the chart file). It names no Hub repo of its own, so the
    published card is the local one, and it holds no local path."""
    block = ConfigBlock.from_dict(config[output_format.CONFIG_BLOCK_KEY])
    src = manifest.source
    base, origin = _origin(config, src)
    title = _title(config, block, base)
    others = [f for f in manifest.files if f.path not in (output_format.MODEL_CARD_NAME, output_format.CHART_NAME)]
    what = ("every rank's state pre-sharded for SGLang's `--load-format presharded`" if block.format == "presharded"
            else "its routed experts pre-laid-out")
    lines = [
        _metadata(manifest, block, base),
        "",
        f"# {title}",
        "",
        f"{origin}, with {what} for FlashInfer's TRT-LLM routed FP8 MoE kernel "
        f"(`{block.kernel}`), the kernel SGLang runs with `--moe-runner-backend {block.moe_runner_backend}`. "
        f"Made with mm-convert {manifest.tool_version}.",
        "",
        *_licence_lines(src.card),
        *(_presharded_sections(block) if block.format == "presharded" else _experts_sections(block)),
        "## Validation",
        "",
        *_validation_table(manifest, chart),
        "## Files",
        "",
        f"{len(others) + 2 + (1 if chart else 0)} files (this card and `{output_format.MANIFEST_NAME}` included), "
        f"{sum(f.size for f in others) / 1e9:.2f} GB; `{output_format.MANIFEST_NAME}` lists every file's size and "
        "sha256 and the tensor census.",
        "",
        "## Reproduce",
        "",
        "```bash",
        *([f"SOURCE=$(mm-convert download {src.repo_id} --revision {src.revision} -q)  # its snapshot in the "
           "Hugging Face cache, sha256-verified"] if src.repo_id else
          ["SOURCE=tiny-source",
           f"mm-convert make-tiny \"$SOURCE\" --dtype {config[SYNTHETIC_KEY].get('dtype')} --seed {config[SYNTHETIC_KEY].get('seed')}"]
          if SYNTHETIC_KEY in config else [f"SOURCE=/path/to/{src.path}  # the local folder it was converted from"]),
        *(_convert_command(block, s) for s in block.shapes),
        "mm-convert validate OUT --source \"$SOURCE\" --record",
        "```",
        "",
        "Without a Blackwell GPU the validation runs mm-convert's own Triton routed FP8 MoE (or its torch reference); "
        "the kernel named above needs SM100/SM103.",
        "",
    ]
    return "\n".join(lines)


def _licence_lines(carried: dict[str, Any]) -> list[str]:
    if "license" not in carried:
        return ["Licence: the source states none in its card; check the source repository before use.", ""]
    name = carried.get("license_name") or carried["license"]
    link = carried.get("license_link")
    return [f"Licence: the source's, carried over unchanged: `{name}`" + (f" ({link})" if link else "") + ".", ""]


def card_files(config: dict, manifest: Manifest) -> dict[str, bytes]:
    """The card and, when validation recorded per-layer errors, its chart: name -> bytes."""
    chart = render_chart(manifest)
    files = {output_format.MODEL_CARD_NAME: render_card(config, manifest, chart is not None).encode()}
    if chart is not None:
        files[output_format.CHART_NAME] = chart.encode()
    return files


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
    """(Re)write OUT/README.md (and its chart) from config + manifest and keep the manifest's record current."""
    config = read_json_object(out / output_format.CONFIG_NAME)
    files = card_files(config, manifest)
    records = []
    for name, data in files.items():
        path = out / name
        atomic_write_bytes(path, data)
        records.append(FileRecord(name, path.stat().st_size, sha256_file(path)))
    if output_format.CHART_NAME not in files:
        (out / output_format.CHART_NAME).unlink(missing_ok=True)  # no per-layer errors recorded any more: no stale chart
    card_names = (output_format.MODEL_CARD_NAME, output_format.CHART_NAME)
    manifest.files = [f for f in manifest.files if f.path not in card_names] + records
    manifest.save(out)


def record_validation(out: str | Path, report: "Report", settings: dict | None = None) -> None:
    """Keep a validation report's summary in the manifest, under the shapes it covered (and the
    settings used), and re-render the card. The validators only read; recording is the write side's."""
    manifest = Manifest.load(Path(out))
    for shape in {f.shape for f in report.findings if f.shape} or {None}:
        summary = report.summary(shape)
        summary["settings"] = settings or {"kernel_requested": report.kernel_requested, "tokens": report.tokens,
                                           "seed": report.seed, "allow_skip": report.allow_skip}
        manifest.validation[shape or "all"] = ValidationSummary.from_dict(summary)
    write_card(Path(out), manifest)  # the card shows the validation table; saves the manifest too
