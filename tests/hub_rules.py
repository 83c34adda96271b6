"""The Hub's documented model-card metadata rules, written down independently of convert/card.py so
that a test can hold the card to them offline (the Hub's own check, POST /api/validate-yaml, needs
the Hub; huggingface_hub checks only that the block parses).

Sources (docs/research/hub-card.md has the lines):
- licence identifiers: hub-docs docs/hub/repositories-licenses.md; `other` asks for `license_name`
  and `license_link` (same page, and docs/hub/model-cards.md "license_name / license_link");
- base_model_relation: docs/hub/model-cards.md ("adapter", "merge", "quantized", "finetune");
- library names: huggingface.js packages/tasks/src/model-libraries.ts (only the ones we could use);
- "Use this model" SGLang/vLLM snippets: packages/tasks/src/local-apps.ts, shown for models tagged
  `transformers` whose pipeline_tag is text-generation or image-text-to-text.
"""

from __future__ import annotations

import re

HUB_LICENSES = set("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl
openmdw-1.0 openmdw-1.1 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 grok2-community gemma unknown other
""".split())
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
SNIPPET_LIBRARIES = {"transformers"}  # the library whose tag makes the SGLang and vLLM snippets appear
SNIPPET_PIPELINES = {"text-generation", "image-text-to-text"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def problems(meta: dict) -> list[str]:
    """What the Hub would reject or ignore in a card's metadata, as short sentences ([] when none)."""
    out = []
    licence = meta.get("license")
    if licence not in HUB_LICENSES:
        out.append(f"license {licence!r} is not a Hub licence identifier")
    if licence == "other" and not (meta.get("license_name") and meta.get("license_link")):
        out.append("license other needs license_name and license_link")
    if "base_model" in meta:
        bases = meta["base_model"] if isinstance(meta["base_model"], list) else [meta["base_model"]]
        out += [f"base_model {b!r} is not a repo id" for b in bases if not isinstance(b, str) or not REPO_ID.match(b)]
        if meta.get("base_model_relation") not in BASE_MODEL_RELATIONS:
            out.append(f"base_model_relation {meta.get('base_model_relation')!r} is not one the Hub knows")
    if meta.get("library_name") not in SNIPPET_LIBRARIES:
        out.append(f"library_name {meta.get('library_name')!r}: the Hub shows no SGLang/vLLM snippet for it")
    if meta.get("pipeline_tag") not in SNIPPET_PIPELINES:
        out.append(f"pipeline_tag {meta.get('pipeline_tag')!r}: no SGLang/vLLM snippet")
    tags = meta.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags) or len(set(tags)) != len(tags):
        out.append("tags must be a list of distinct strings")
    return out
