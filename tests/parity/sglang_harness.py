"""Load a MiniMax-M2 FP8 checkpoint through SGLang's own MoE weight loader, on a CPU-only machine.

Nothing of SGLang is re-implemented here: the harness only sets up the process state that an
SGLang scheduler process would have, then calls SGLang's code:

- `ServerArgs(..., tp_size, ep_size, moe_runner_backend="flashinfer_trtllm_routed")` and
  `runtime_context.publish(..., ranks=SpawnRanks(world_rank=rank))`: SGLang's own resolution
  pipeline and rank derivation (tp_rank, moe_tp_rank, moe_ep_rank) for one rank;
- `initialize_moe_config()`: the MoE runner backend flag, as scheduler init sets it;
- `ModelConfig.from_server_args` + the model loader's `_get_quantization_config`: the real
  `Fp8Config` (block [128, 128], dynamic activations) parsed from the checkpoint's config.json;
- `compute_initial_expert_location_metadata` (`--init-expert-location trivial`), as ModelRunner
  installs it before loading;
- `MiniMaxM2MoE(...)`, the model's real MoE block (it picks `FusedMoE` through
  `get_moe_impl_class` and builds `Fp8MoEMethod` weights), one per decoder layer;
- `MiniMaxM2ForCausalLM.load_weights`, called unbound on a stand-in module that holds only the MoE
  blocks at their real parameter names, fed by SGLang's `safetensors_weights_iterator`;
- `DefaultModelLoader.postprocess_weights` (each module's `process_weights_after_loading`).

What has to be faked, and why, is listed in docs/SGLANG_PARITY.md.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

SGLANG_VERSION = "0.5.23"
MOE_RUNNER_BACKEND = "flashinfer_trtllm_routed"
EXPERT_KINDS = ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv")
# SGLang allocates the FP8 weight buffers with torch.empty (undefined bytes on a GPU). They are
# filled with this byte before loading so that any byte the loader leaves unwritten shows up as a
# difference instead of passing by luck as a zero.
WEIGHT_SENTINEL = 0x5A


# -- making `import sglang` work on a CPU-only torch ------------------------------------------


class _Placeholder(type):
    """Any attribute of the stub is a class; calling one gives another. Import-time use only."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args, **kwargs):
        return _Placeholder("instance", (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision` and its submodules as placeholder modules.

    sglang.srt.configs imports its multimodal helpers (and with them `torchvision.transforms`)
    unconditionally. PyPI's torchvision wheels are CUDA builds whose `_C.so` links
    `libtorch_cuda.so`, which a CPU torch does not have, so the real one cannot be installed.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _install_torchvision_stub() -> bool:
    if importlib.util.find_spec("torchvision") is not None:
        return False
    if any(isinstance(f, _TorchvisionStubFinder) for f in sys.meta_path):
        return True
    try:
        # transformers caches "is torchvision available?"; ask it before the stub exists, so it
        # keeps answering no (the stub has no version and would break its version checks).
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    except ImportError:
        pass
    sys.meta_path.append(_TorchvisionStubFinder())
    return True


_IMPORT_STATE: dict[str, object] = {}


def import_sglang() -> str | None:
    """Import the SGLang modules the harness calls. None on success, else why not (one line)."""
    if "error" in _IMPORT_STATE:
        return _IMPORT_STATE["error"]  # type: ignore[return-value]
    error = _import_sglang()
    _IMPORT_STATE["error"] = error
    return error


def _import_sglang() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return "the sglang package is not installed (see tests/parity/requirements.txt)"
    _IMPORT_STATE["torchvision_stub"] = _install_torchvision_stub()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sglang

            version = getattr(sglang, "__version__", None)
            if version != SGLANG_VERSION:
                return f"sglang {version} is installed; this harness is pinned to sglang=={SGLANG_VERSION}"
            # The model registry logs one line per model it cannot import (most need CUDA packages).
            logging.getLogger("sglang.srt.models.registry").setLevel(logging.ERROR)
            from sglang.srt.models import minimax_m2  # noqa: F401  (the import chain under test)
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
        return f"import sglang failed: {type(e).__name__}: {e}"
    return None


# -- one rank of SGLang ------------------------------------------------------------------------


@dataclass
class RankLoad:
    """What SGLang holds for one rank, per layer, keyed by the parameter's full name."""

    loaded: dict[str, torch.Tensor]  # right after load_weights
    processed: dict[str, torch.Tensor] | None  # after process_weights_after_loading
    process_error: str | None
    info: dict[str, object] = field(default_factory=dict)


def _publish(src: Path, tp: int, ep: int, rank: int):
    from sglang.srt import runtime_context as rc
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.server_args import ServerArgs

    rc.reset_context()
    # device="cuda": the resolution pipeline otherwise probes for an accelerator and stops.
    server_args = ServerArgs(
        model_path=str(src), tp_size=tp, ep_size=ep, moe_runner_backend=MOE_RUNNER_BACKEND, device="cuda"
    )
    rc.publish(server_args, role="test", ranks=rc.SpawnRanks(world_rank=rank))
    initialize_moe_config()
    return server_args


def _stand_in_model(config, moe_blocks: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """A module whose parameters have exactly the names MiniMaxM2ForCausalLM gives its MoE blocks."""
    root = torch.nn.Module()
    root.config = config
    root.model = torch.nn.Module()
    layers = torch.nn.ModuleList()
    for layer in range(config.num_hidden_layers):
        decoder = torch.nn.Module()
        if layer in moe_blocks:
            decoder.block_sparse_moe = moe_blocks[layer]
        layers.append(decoder)
    root.model.layers = layers
    return root


def _expert_tensors(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in root.named_parameters()
        if name.rpartition(".")[2] in EXPERT_KINDS and ".block_sparse_moe.experts." in name
    }


def load_rank(src: Path, tp: int, ep: int, rank: int, layers: list[int] | None = None) -> RankLoad:
    """Build SGLang's MoE blocks for `rank` of a (tp, ep) launch and load `src` into them."""
    err = import_sglang()
    if err:
        raise RuntimeError(err)
    from sglang.srt import runtime_context as rc
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import (
        compute_initial_expert_location_metadata,
        set_global_expert_location_metadata,
    )
    from sglang.srt.model_loader.loader import DefaultModelLoader, _get_quantization_config
    from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator
    from sglang.srt.models.minimax_m2 import MiniMaxM2ForCausalLM, MiniMaxM2MoE

    src = Path(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server_args = _publish(src, tp, ep, rank)
        model_config = ModelConfig.from_server_args(server_args)
        quant_config = _get_quantization_config(model_config, LoadConfig())
        parallel = rc.get_parallel()
        # ExpertLocationMetadata moves its maps to the configured device; there is no CUDA here.
        with rc.get_device().override(device="cpu"):
            metadata = compute_initial_expert_location_metadata(model_config=model_config, moe_ep_rank=parallel.moe_ep_rank)
        set_global_expert_location_metadata(metadata, allow_overwrite=True)

        hf_config = model_config.hf_config
        wanted = list(range(hf_config.num_hidden_layers)) if layers is None else list(layers)
        blocks = {
            layer: MiniMaxM2MoE(
                config=hf_config, layer_id=layer, quant_config=quant_config, prefix=f"model.layers.{layer}.block_sparse_moe"
            )
            for layer in wanted
        }
        root = _stand_in_model(hf_config, blocks)
        for name, p in root.named_parameters():
            if name.endswith(("experts.w13_weight", "experts.w2_weight")):
                p.data.view(torch.uint8).fill_(WEIGHT_SENTINEL)

        shards = sorted(str(p) for p in src.glob("*.safetensors"))
        MiniMaxM2ForCausalLM.load_weights(root, safetensors_weights_iterator(shards))
        loaded = _expert_tensors(root)

        experts = blocks[wanted[0]].experts
        info = {
            "tp_rank": parallel.tp_rank,
            "moe_tp_size": parallel.moe_tp_size,
            "moe_ep_size": parallel.moe_ep_size,
            "moe_tp_rank": experts.moe_tp_rank,
            "moe_ep_rank": experts.moe_ep_rank,
            "num_local_experts": experts.num_local_experts,
            "intermediate_size_per_partition": experts.intermediate_size_per_partition,
            "runner_backend": str(experts.runner_backend),
            "quant_method": type(experts.quant_method).__name__,
            "weight_block_size": list(quant_config.weight_block_size),
            "use_flashinfer_trtllm_moe": experts.use_flashinfer_trtllm_moe,
            "use_padded_loading": experts.use_padded_loading,
        }
        processed, process_error = None, None
        try:
            DefaultModelLoader.postprocess_weights(root, torch.device("cpu"))
            processed = _expert_tensors(root)
        except Exception as e:  # noqa: BLE001 - reported, not hidden: the test shows it
            process_error = f"{type(e).__name__}: {e}"
    return RankLoad(loaded=loaded, processed=processed, process_error=process_error, info=info)


# -- comparing ---------------------------------------------------------------------------------

# The dimension of each tensor (after the expert dimension) that runs over intermediate rows.
_INTERMEDIATE_DIM = {"w13_weight": 1, "w13_weight_scale_inv": 1, "w2_weight": 2, "w2_weight_scale_inv": 2}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _ranges(indices: list[int]) -> str:
    out, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


def _value(t: torch.Tensor, index: tuple[int, ...]) -> str:
    v = t[index]
    if t.dtype == torch.float8_e4m3fn:
        return f"0x{int(v.view(torch.uint8)):02x}({float(v.float()):g})"
    return f"{float(v):g}"


def describe_difference(name: str, sglang: torch.Tensor, ours: torch.Tensor) -> str | None:
    """None when byte-identical, else one line saying where and how they differ."""
    if sglang.dtype != ours.dtype or tuple(sglang.shape) != tuple(ours.shape):
        return f"{name}: sglang {sglang.dtype} {tuple(sglang.shape)} vs mm-convert {ours.dtype} {tuple(ours.shape)}"
    a, b = _raw(sglang), _raw(ours)
    if torch.equal(a, b):
        return None
    kind = name.rpartition(".")[2]
    width = sglang.element_size()
    diff = (a != b).reshape(*sglang.shape, width).any(-1)
    dim = _INTERMEDIATE_DIM.get(kind, 1)
    other = tuple(d for d in range(1, sglang.dim()) if d != dim)
    per_row = diff.any(dim=other) if other else diff  # [experts, intermediate index]
    experts = per_row.any(1).nonzero().flatten().tolist()
    rows = per_row.any(0).nonzero().flatten().tolist()
    first = tuple(int(i) for i in diff.nonzero()[0])
    axis = "rows" if dim == 1 else "columns"
    return (
        f"{name}: {int(diff.sum())} of {diff.numel()} elements differ; local experts {_ranges(experts)}; "
        f"{axis} (dim {dim}) {_ranges(rows)}; first at {list(first)}: "
        f"sglang {_value(sglang, first)} vs mm-convert {_value(ours, first)}"
    )


def compare(sglang: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> list[str]:
    problems = [f"{n}: missing from mm-convert's output" for n in sorted(set(sglang) - set(ours))]
    problems += [f"{n}: in mm-convert's output, not in SGLang's layer" for n in sorted(set(ours) - set(sglang))]
    for n in sorted(set(sglang) & set(ours)):
        d = describe_difference(n, sglang[n], ours[n])
        if d:
            problems.append(d)
    return problems
