"""Fuzzing the safetensors header reader (hypothesis, bounded time): whatever the bytes, it returns a
validated header or raises the tool's own one-line SourceError: no other exception, no hang, and
no allocation sized by the file's claims (a header length or shape is checked before it is used)."""

from __future__ import annotations

import json
import tracemalloc
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm_convert.errors import SourceError
from mm_convert.read.safetensors_file import read_header

FUZZ = settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    """One scratch file, rewritten per example, in pytest's own temporary tree (removed with it)."""
    return tmp_path_factory.mktemp("fuzz") / "fuzz.safetensors"


def _check(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        header = read_header(path)
    except SourceError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message
    else:
        # Accepted: then it must really tile the data section.
        data = len(blob) - 8 - header.header_bytes
        assert sum(t.nbytes for t in header.tensors) == data
        assert all(8 + header.header_bytes <= t.start and t.start + t.nbytes <= len(blob) for t in header.tensors)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Nothing sized by the header's claims: what one read allocates is bounded by the blob itself.
    assert peak < 64 * 1024 + 16 * len(blob), peak


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(path, blob):
    _check(path, blob)


@FUZZ
@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=256))
def test_any_header_length(path, length, rest):
    _check(path, struct.pack("<Q", length) + rest)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
_dtypes = st.sampled_from(["F8_E4M3", "BF16", "F32", "I64", "U8", "BOOL", "F4", "", "f32"]) | st.text(max_size=6)
_shapes = st.lists(st.integers(min_value=-3, max_value=2**40), max_size=9) | _json_values
_entry = st.fixed_dictionaries(
    {"dtype": _dtypes, "shape": _shapes,
     "data_offsets": st.lists(st.integers(min_value=-5, max_value=2**48), min_size=0, max_size=3) | _json_values},
)


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=20), _entry | _json_values, max_size=6),
       st.integers(min_value=0, max_value=600), st.booleans())
def test_structured_headers(path, entries, data_len, pad):
    text = json.dumps(entries).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    _check(path, struct.pack("<Q", len(text)) + text + b"\x00" * data_len)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["F8_E4M3", "BF16", "F32"]),
                          st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=3)),
                min_size=1, max_size=5),
       st.integers(min_value=-16, max_value=16), st.data())
def test_nearly_valid_files(path, specs, slack, data):
    """Well-formed headers with one offset nudged or a few bytes more or less: exact accept/refuse."""
    sizes = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    header, offset = {}, 0
    for i, (dtype, shape) in enumerate(specs):
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    victim = data.draw(st.sampled_from(sorted(header)))
    nudge = data.draw(st.integers(min_value=-3, max_value=3))
    header[victim]["data_offsets"][1] += nudge
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + b"\x01" * max(0, offset + slack)
    _check(path, blob)
