"""mm-convert: MiniMax-M2.5 checkpoints made ready to serve with FlashInfer's routed FP8 MoE kernel.

The package's stages, in the order data flows through them:

    mm_convert.read        the source: safetensors headers, checks, lazy reads; the Hub download and cache
    mm_convert.plan        every output file and tensor, with shapes and offsets, before a byte moves
    mm_convert.transform   quantisation and the layout profiles (pure functions), the rank-tensor stream
    mm_convert.write       staging, journal, commit; presharded files, manifest, model card
    mm_convert.validators  read-only checks of a converted checkpoint (structure, exact, kernel)
    mm_convert.publish     the Hub upload
    mm_convert.commands    one orchestrator per command (convert, run, inspect)

The public API is the six functions below (documented in mm_convert.api) and the exceptions of
mm_convert.errors.
"""

__version__ = "0.2.0"

from mm_convert.api import convert, download, inspect, plan, publish, run, validate  # noqa: E402
from mm_convert.errors import (  # noqa: E402
    CheckFailed,
    HubError,
    MMConvertError,
    OutputError,
    RequestError,
    SourceError,
)

__all__ = [
    "__version__", "convert", "plan", "validate", "inspect", "download", "publish", "run",
    "MMConvertError", "SourceError", "RequestError", "OutputError", "CheckFailed", "HubError",
]
