"""What a user asks for, and its defaults, in one place: `ConvertSpec`, `ValidateSpec` and
`PublishSpec` are read from a recipe, filled from command-line flags and taken by the Python API, so
every way in shares one set of defaults (the fields below). Recipes: one TOML file per deployment
shape, read by `convert --recipe` and `run`.

```toml
name = "minimax-m2.5-tp4"
[source]    repo_id, revision (a pinned commit) | path (a local folder) | tiny = {dtype, seed}
[convert]   format (presharded | experts), profile, tp, ep, gpu_arch (presharded: sm100 | sm90),
            ranks (presharded: a list, default all), part_size (experts: "5GB" or bytes), chunk_size,
            device, output
[validate]  enabled, kernel, layers ("auto" or a list), tokens, seed, device, allow_skip
[publish]   enabled, repo_id, private, revision (a branch), batch_size
```
Unknown keys are refused, so a typo never silently falls back to a default. Relative paths are
resolved against the current directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mm_convert.errors import RequestError
from mm_convert.output_format import DEFAULT_PART_SIZE
from mm_convert.plan.sglang_state import DEFAULT_GPU_ARCH
from mm_convert.units import parse_size

DEFAULT_CHUNK_SIZE = 256 * 10**6  # source bytes per chunk of experts (BF16 counts its quantisation temporaries)
DEFAULT_BATCH_SIZE = 50 * 10**9  # per commit when publishing: several commits for a 230 GB checkpoint

# The kernel check's backends (validators/kernels/select.py picks among them).
KERNEL_CHOICES = ("auto", "reference", "triton", "cutlass", "trtllm")


@dataclass(frozen=True)
class SourceSpec:
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    tiny_dtype: str | None = None
    tiny_seed: int = 0

    @property
    def is_tiny(self) -> bool:
        return self.tiny_dtype is not None


@dataclass(frozen=True)
class ConvertSpec:
    profile: str = "sglang"
    tp: int = 1
    ep: int = 1
    part_size: int = DEFAULT_PART_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    device: str = "cpu"
    output: str | None = None
    format: str | None = None  # None: presharded for the sglang profile, experts for trtllm
    gpu_arch: str = DEFAULT_GPU_ARCH
    ranks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ValidateSpec:
    enabled: bool = True
    kernel: str = "auto"
    layers: tuple[int, ...] | None = None  # None: a spread including the first and last layer
    tokens: int = 64
    seed: int = 0
    device: str | None = None  # the reference backend's device; None: cuda when there is one
    allow_skip: bool = False


@dataclass(frozen=True)
class PublishSpec:
    enabled: bool = False
    repo_id: str | None = None
    private: bool = True
    revision: str = "main"
    batch_size: int = DEFAULT_BATCH_SIZE


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path | None = None
    source: SourceSpec = field(default_factory=SourceSpec)
    convert: ConvertSpec = field(default_factory=ConvertSpec)
    validate: ValidateSpec = field(default_factory=ValidateSpec)
    publish: PublishSpec = field(default_factory=PublishSpec)
    work_dir: str | None = None  # where downloads and tiny sources go; default: ./mm-convert-work/<name>

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir or f"mm-convert-work/{self.name}")

    @property
    def output_path(self) -> Path:
        return Path(self.convert.output) if self.convert.output else self.work_path / "out"


def _table(data: dict, key: str, where: str) -> dict:
    """A recipe section: one TOML table ([source]), not a value (`source = 5`) or a list ([[source]])."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise RequestError(f"{where}: {key} must be a table ([{key}]), not {type(value).__name__}")
    return value


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RequestError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _typed(table: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{where}: {key} = {value!r} has the wrong type")
    return value


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RequestError(f"{path}: recipe not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RequestError(f"{path}: not a readable TOML recipe ({exc})") from exc
    where = str(path)
    _check_keys(data, {"name", "work_dir", "source", "convert", "validate", "publish"}, where)
    return Recipe(
        name=_typed(data, "name", str, where, path.stem),
        path=path,
        source=_source_section(data, where),
        convert=_convert_section(data, where),
        validate=_validate_section(data, where),
        publish=_publish_section(data, where),
        work_dir=_typed(data, "work_dir", str, where, None),
    )


def _source_section(data: dict, where: str) -> SourceSpec:
    src = _table(data, "source", where)
    _check_keys(src, {"repo_id", "revision", "path", "tiny"}, f"{where} [source]")
    tiny = src.get("tiny")
    if tiny is not None and not isinstance(tiny, dict):
        raise RequestError(f"{where} [source]: tiny must be a table, e.g. tiny = {{ dtype = \"fp8\", seed = 0 }}")
    if tiny is not None:
        _check_keys(tiny, {"dtype", "seed"}, f"{where} [source.tiny]")
    source = SourceSpec(
        repo_id=_typed(src, "repo_id", str, where, None),
        revision=_typed(src, "revision", str, where, None),
        path=_typed(src, "path", str, where, None),
        tiny_dtype=_typed(tiny, "dtype", str, where, "fp8") if tiny is not None else None,
        tiny_seed=_typed(tiny, "seed", int, where, 0) if tiny is not None else 0,
    )
    chosen = [k for k, v in (("repo_id", source.repo_id), ("path", source.path), ("tiny", tiny)) if v is not None]
    if len(chosen) != 1:
        raise RequestError(f"{where} [source]: give exactly one of repo_id, path or tiny (got {chosen or 'none'})")
    return source


def _convert_section(data: dict, where: str) -> ConvertSpec:
    conv = _table(data, "convert", where)
    _check_keys(conv, {f.name for f in fields(ConvertSpec)}, f"{where} [convert]")
    d = ConvertSpec()
    convert = ConvertSpec(
        profile=_typed(conv, "profile", str, where, d.profile),
        tp=_typed(conv, "tp", int, where, d.tp),
        ep=_typed(conv, "ep", int, where, d.ep),
        part_size=parse_size(conv.get("part_size", d.part_size), f"{where} [convert] part_size"),
        chunk_size=parse_size(conv.get("chunk_size", d.chunk_size), f"{where} [convert] chunk_size"),
        device=_typed(conv, "device", str, where, d.device),
        output=_typed(conv, "output", str, where, d.output),
        format=_typed(conv, "format", str, where, d.format),
        gpu_arch=_typed(conv, "gpu_arch", str, where, d.gpu_arch),
        ranks=_ranks(conv, where),
    )
    return convert


def _validate_section(data: dict, where: str) -> ValidateSpec:
    val = _table(data, "validate", where)
    _check_keys(val, {f.name for f in fields(ValidateSpec)}, f"{where} [validate]")
    layers = val.get("layers", "auto")
    if layers == "auto":
        layers_t = None
    elif isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        layers_t = tuple(layers)
    else:
        raise RequestError(f"{where} [validate]: layers must be \"auto\" or a list of layer numbers")
    v = ValidateSpec()
    kernel = _typed(val, "kernel", str, where, v.kernel)
    if kernel not in KERNEL_CHOICES:
        raise RequestError(f"{where} [validate]: kernel {kernel!r} is not one of {', '.join(KERNEL_CHOICES)}")
    validate = ValidateSpec(
        enabled=_typed(val, "enabled", bool, where, v.enabled),
        kernel=kernel,
        layers=layers_t,
        tokens=_typed(val, "tokens", int, where, v.tokens),
        seed=_typed(val, "seed", int, where, v.seed),
        device=_typed(val, "device", str, where, v.device),
        allow_skip=_typed(val, "allow_skip", bool, where, v.allow_skip),
    )
    return validate


def _publish_section(data: dict, where: str) -> PublishSpec:
    pub = _table(data, "publish", where)
    _check_keys(pub, {f.name for f in fields(PublishSpec)}, f"{where} [publish]")
    p = PublishSpec()
    publish = PublishSpec(
        enabled=_typed(pub, "enabled", bool, where, p.enabled),
        repo_id=_typed(pub, "repo_id", str, where, p.repo_id),
        private=_typed(pub, "private", bool, where, p.private),
        revision=_typed(pub, "revision", str, where, p.revision),
        batch_size=parse_size(pub.get("batch_size", p.batch_size), f"{where} [publish] batch_size"),
    )
    if publish.enabled and not publish.repo_id:
        raise RequestError(f"{where} [publish]: enabled but no repo_id")
    return publish


def _ranks(table: dict, where: str) -> tuple[int, ...] | None:
    value = table.get("ranks")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise RequestError(f"{where} [convert]: ranks must be a non-empty list of rank numbers, e.g. [0, 1]")
    return tuple(sorted(set(value)))


def override(spec: ConvertSpec, **flags: Any) -> ConvertSpec:
    """Command-line flags win over the recipe; a flag left unset (None) keeps the recipe's value."""
    return replace(spec, **{k: v for k, v in flags.items() if v is not None})
