"""Byte sizes, read and written one way everywhere: decimal units (kB, MB, GB, TB, as the Hub, tqdm
and disk tools print them); `GiB`-style binary units are read too."""

from __future__ import annotations

import re
from typing import Any

from mm_convert.errors import RequestError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: Any, what: str = "size") -> int:
    """`5GB`, `500MB`, `2GiB` or a plain number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise RequestError(f"{what}: cannot read {value!r} as a size (e.g. 5GB, 500MB, 2GiB)")
        n = int(float(m[1]) * _UNITS[(m[2] or "B").upper()])
    if n <= 0:
        raise RequestError(f"{what}: must be positive, got {value!r}")
    return n


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB'; three significant digits from kB up."""
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")
