"""Progress bars for long work: bytes, rate and ETA; silenced by --quiet."""

from __future__ import annotations

from tqdm import tqdm


def byte_bar(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=quiet,
        dynamic_ncols=True,
        mininterval=0.5,
        leave=True,
    )
