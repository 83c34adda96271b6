"""Peak memory stays bounded as layers are added (measured in a subprocess, not by timing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from convert.tiny import TINY, make_synthetic

MEDIUM = replace(TINY, hidden_size=1024, intermediate_size=512, num_experts=64, top_k=8, vocab_size=256,
                 num_shards=3, random_fp8_bytes=True)
LAYER_BYTES = 64 * 3 * 1024 * 512  # FP8 expert bytes of one layer: 100 MB

# VmHWM is the peak resident set of this process image; ru_maxrss would carry over the parent's
# peak across fork and exec (Linux keeps it), which is why the test process's own size must not count.
MEASURE = """
import json, sys
from convert.cli import main
src, out, profile = sys.argv[1:4]
sys.argv = ["mm-convert", "convert", src, out, "--profile", profile, "--tp", "4", "--quiet", "--chunk-size", "8MB"]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_kib": int(hwm.split()[1])}))
"""


def _peak_mib(source, out, profile) -> float:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(source), str(out), profile],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


@pytest.mark.parametrize("profile", ["sglang", "trtllm"])
def test_peak_memory_does_not_grow_with_layers(tmp_path, profile):
    peaks = {}
    # 8 MB chunks: about 13 chunks per projection group, so the pipeline (a few chunks in flight) is
    # full within the first layer and the peak is reached; more layers must not raise it.
    for layers in (3, 9):
        src, out = tmp_path / f"src{layers}", tmp_path / f"out{layers}"
        try:
            make_synthetic(src, replace(MEDIUM, num_layers=layers), "fp8", seed=1)
            peaks[layers] = _peak_mib(src, out, profile)
        finally:
            # About 2 GB on disk at 9 layers: CI machines may have little free, so none of it is kept.
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    growth = peaks[9] - peaks[3]
    # Six more layers (600 MB of experts, 700 MB of output) may not add more than a fifth of one layer.
    assert growth < 0.2 * LAYER_BYTES / 2**20, peaks
