"""One SGLang 0.5.23 rank on a CPU: parse a launch command with SGLang's own parser, load the model
with SGLang's own loader (`auto`, `presharded`, ...), and save everything the rank then holds.

Started once per rank by `tests/parity/sglang_launch.py` (gloo process group over TCP, as
`sglang.launch_server` starts one scheduler per GPU over NCCL). Each job is a launch command:

    {"id": "...", "command": "python -m sglang.launch_server --model-path ... --load-format presharded ...",
     "gpu_arch": "sm90" | "sm100", "forbid_dump": true}

and writes `OUT/<id>-rank<r>.safetensors` (every entry of the model's state_dict after loading,
contiguous, under its own name) and `OUT/<id>-rank<r>.json` ({"ok", "error", "dumped", "loader"}).
With `forbid_dump`, a presharded load whose folder SGLang does not find by its key fails instead of
silently doing SGLang's "first-time load and dump". What is faked to run on a CPU, and why, is in
docs/SGLANG_PARITY.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import types
import warnings
from pathlib import Path

import torch

from tests.parity import sglang_harness as harness

LAUNCH_PREFIX = ["python", "-m", "sglang.launch_server"]


def _install_forward_kernel_stub() -> None:
    """`RotaryEmbedding.__init__` imports `vllm._custom_ops.rotary_embedding` off CUDA; only a forward pass calls it."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("forward kernels are not available in the CPU loading harness")

    vllm = types.ModuleType("vllm")
    vllm.__path__ = []  # type: ignore[attr-defined]
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = unavailable  # type: ignore[attr-defined]
    sys.modules.setdefault("vllm", vllm)
    sys.modules.setdefault("vllm._custom_ops", ops)


def _install_deep_gemm_stub() -> None:
    """The one DeepGEMM helper SGLang's SM100 post-processing calls: the UE8M0 scale layout. It is
    given SGLang's own torch implementation of it (`fp8_utils._get_mn_major_tma_aligned_packed_ue8m0_tensor_torch_impl`)."""
    from sglang.srt.layers.quantization import fp8_utils

    def ceil_div(x: int, y: int) -> int:
        return (x + y - 1) // y

    def align(x: int, y: int) -> int:
        return ceil_div(x, y) * y

    def get_tma_aligned_size(x: int, element_size: int) -> int:
        return align(x, 16 // element_size)  # TMA: 16-byte aligned strides

    dg, utils, layout = (types.ModuleType(n) for n in ("deep_gemm", "deep_gemm.utils", "deep_gemm.utils.layout"))
    utils.align, utils.ceil_div, utils.get_tma_aligned_size = align, ceil_div, get_tma_aligned_size  # type: ignore[attr-defined]
    layout.get_mn_major_tma_aligned_packed_ue8m0_tensor = fp8_utils._get_mn_major_tma_aligned_packed_ue8m0_tensor_torch_impl  # type: ignore[attr-defined]
    dg.utils, utils.layout = utils, layout  # type: ignore[attr-defined]
    sys.modules.update({"deep_gemm": dg, "deep_gemm.utils": utils, "deep_gemm.utils.layout": layout})


# What a CUDA host with SGLang's own sgl-deep-gemm dependency computes at import time
# (layers/deep_gemm_wrapper/configurer.py L33-60) and what its platform reports.
_ARCH = {
    "sm90": dict(platform=dict(is_sm90=True, is_sm100=False, is_blackwell=False, is_sm110=False, is_sm120=False,
                               is_sm100_or_sm110=False, device_sm=90, device_capability=(9, 0)),
                 flags=dict(ENABLE_JIT_DEEPGEMM=True, DEEPGEMM_SCALE_UE8M0=False, DEEPGEMM_BLACKWELL=False), sm=90),
    "sm100": dict(platform=dict(is_sm90=False, is_sm100=True, is_blackwell=True, is_sm110=False, is_sm120=False,
                                is_sm100_or_sm110=True, device_sm=100, device_capability=(10, 0)),
                  flags=dict(ENABLE_JIT_DEEPGEMM=True, DEEPGEMM_SCALE_UE8M0=True, DEEPGEMM_BLACKWELL=True), sm=100),
}


def _patch_arch(name: str | None) -> None:
    """Make SGLang's architecture checks answer as on `name`; None leaves the CPU's answers (the
    SM90 state: no DeepGEMM, so no re-quantisation)."""
    if name is None:
        return
    from sglang.srt import runtime_context as rc
    from sglang.srt.layers import deep_gemm_wrapper
    from sglang.srt.layers.deep_gemm_wrapper import configurer, entrypoint
    from sglang.srt.layers.quantization import fp8_utils
    from sglang.srt.model_loader import utils as loader_utils

    arch = _ARCH[name]
    rc.override_platform(**arch["platform"]).install()
    for module in (deep_gemm_wrapper, configurer, entrypoint):
        for flag, value in arch["flags"].items():
            setattr(module, flag, value)
    loader_utils.get_device_sm = lambda: arch["sm"]
    fp8_utils.FP8_GEMM_RUNNER_BACKEND = None  # re-resolved from the server args by initialize_fp8_gemm_config


def _server_args(command: str):
    from sglang.srt.server_args import prepare_server_args

    argv = shlex.split(command)
    if argv[: len(LAUNCH_PREFIX)] != LAUNCH_PREFIX:
        raise ValueError(f"not an sglang.launch_server command: {command}")
    # device: the argument resolution otherwise probes for an accelerator and stops on a CPU.
    return prepare_server_args(argv[len(LAUNCH_PREFIX):] + ["--device", "cuda"])


class _Distributed:
    """This worker's gloo process group, built afresh for each job (as each launch builds its own)."""

    def __init__(self, world: int, rank: int, rendezvous: Path):
        self.world, self.rank, self.rendezvous, self.jobs = world, rank, rendezvous, 0

    def start(self, server_args) -> None:
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.layers.dp_attention import initialize_dp_attention

        # A file rendezvous, not a TCP port: a port picked in advance can be taken by then (EADDRINUSE
        # on one rank left the others waiting). A rank that fails mid-job stops the others in 120 s.
        ps.init_distributed_environment(backend="gloo", world_size=self.world, rank=self.rank, local_rank=self.rank,
                                        distributed_init_method=f"file://{self.rendezvous}-{self.jobs}", timeout=120)
        self.jobs += 1
        ps.initialize_model_parallel()
        initialize_dp_attention(server_args=server_args)

    def stop(self) -> None:
        from sglang.srt.distributed import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


def run_job(job: dict, dist: _Distributed, out: Path) -> dict:
    from sglang.srt import runtime_context as rc
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.layers.quantization import fp8_utils
    from sglang.srt.model_executor.model_runner_components.load_model_utils import build_load_config
    from sglang.srt.model_loader import get_model
    from sglang.srt.model_loader.loader import PreshardedModelLoader
    from sglang.srt.runtime_context import get_model as model_settings

    state = {"dumped": False}
    original_dump = PreshardedModelLoader._first_time_load_and_dump

    def first_time_load_and_dump(self, *args, **kwargs):
        state["dumped"] = True
        if job.get("forbid_dump"):
            raise RuntimeError("SGLang did not find the presharded folder by its key: it would load and dump anew")
        return original_dump(self, *args, **kwargs)

    PreshardedModelLoader._first_time_load_and_dump = first_time_load_and_dump
    try:
        server_args = _server_args(job["command"])
        rc.reset_context()
        _patch_arch(job.get("gpu_arch"))
        rc.publish(server_args, role="test", ranks=rc.SpawnRanks(world_rank=dist.rank))
        initialize_moe_config()
        fp8_utils.initialize_fp8_gemm_config()
        dist.start(server_args)
        settings = model_settings()
        load_config = build_load_config(
            server_args=server_args, tp_rank=dist.rank, remote_instance_weight_transporter_engine=None,
            remote_instance_weight_transporter_session_id="", draft_model_idx=None,
            weight_cache_mode=settings.weight_cache_mode, weight_cache_socket=None)
        model_config = ModelConfig.from_server_args(server_args)
        model = get_model(model_config=model_config, load_config=load_config, device_config=DeviceConfig("cpu"))
        tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
        from safetensors.torch import save_file

        save_file(tensors, str(out / f"{job['id']}-rank{dist.rank}.safetensors"))
        return {"ok": True, "error": None, "dumped": state["dumped"], "tensors": len(tensors),
                "load_format": load_config.load_format}
    except Exception as e:  # noqa: BLE001 - the test reads why it failed
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "dumped": state["dumped"]}
    finally:
        PreshardedModelLoader._first_time_load_and_dump = original_dump
        dist.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--rendezvous", type=Path, required=True)
    parser.add_argument("--jobs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _install_forward_kernel_stub()
    error = harness.import_sglang()
    if error:
        raise SystemExit(error)
    _install_deep_gemm_stub()
    logging.getLogger("sglang").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist = _Distributed(args.world, args.rank, args.rendezvous)
    for job in json.loads(args.jobs.read_text()):
        result = run_job(job, dist, args.out)
        (args.out / f"{job['id']}-rank{args.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
