"""Damaged or hostile safetensors headers are refused at open, naming the file and the tensor, before any
memory is sized from them."""

from __future__ import annotations

import json
import resource
import struct

import pytest
import torch

import diffusion_merge.merging as merging
from diffusion_merge.merging.io import NotSafetensorsError, SafetensorsFile


def write_raw(path, header: object, data: bytes = b"", header_bytes: bytes | None = None, length: int | None = None):
    """A file with the given header (JSON-encoded unless ``header_bytes``) and data section."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_HEADERS = {
    "unknown dtype": ({"w": entry(dtype="F128")}, "unsupported dtype 'F128'"),
    "dtype not a string": ({"w": entry(dtype=4)}, "unsupported dtype 4"),
    "negative dimension": ({"w": entry(shape=(-2,))}, r"shape \[-2\]"),
    "fractional dimension": ({"w": entry(shape=(2.5,))}, r"shape \[2.5\]"),
    "boolean dimension": ({"w": entry(shape=(True, 2))}, r"shape \[true, 2\]|shape \[True, 2\]"),
    "shape not a list": ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "shape '2'"),
    "span too small for the shape": ({"w": entry(shape=(4, 4))}, r"\[4, 4\] F32 \(64 bytes\).*span 8 bytes"),
    "span too large for the shape": ({"w": entry(shape=(1,))}, r"\(4 bytes\).*span 8 bytes"),
    "begin after end": ({"w": entry(offsets=(8, 0))}, "end before they begin"),
    "negative offset": ({"w": entry(offsets=(-8, 0))}, "data_offsets"),
    "one offset": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, "data_offsets"),
    "past the end of the file": ({"w": entry(shape=(4,), offsets=(0, 16))}, "ends at byte 16.*8 bytes of data"),
    "overlapping tensors": ({"a": entry(), "b": entry(shape=(1,), offsets=(4, 8))}, "'a' and 'b' overlap"),
    "entry not a table": ({"w": [1, 2]}, "no dtype/shape/data_offsets"),
    "metadata not strings": ({"__metadata__": {"a": 1}, "w": entry()}, "__metadata__"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS), ids=list(BAD_HEADERS))
def test_bad_header_is_refused_at_open_naming_file_and_tensor(tmp_path, case):
    header, message = BAD_HEADERS[case]
    path = write_raw(tmp_path / "damaged.safetensors", header, bytes(8))
    with pytest.raises(NotSafetensorsError, match=message) as raised:
        SafetensorsFile(path)
    assert "damaged.safetensors" in str(raised.value)
    if case != "metadata not strings":
        assert "'w'" in str(raised.value) or "'a'" in str(raised.value)


def test_duplicate_key_is_refused(tmp_path):
    raw = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    path = write_raw(tmp_path / "twice.safetensors", None, bytes(8), header_bytes=raw)
    with pytest.raises(NotSafetensorsError, match=r"'twice\.safetensors'.*'w' twice"):
        SafetensorsFile(path)


def test_header_length_beyond_the_file_says_truncated(tmp_path):
    path = write_raw(tmp_path / "cut.safetensors", {"w": entry()}, bytes(8), length=4096)
    with pytest.raises(NotSafetensorsError, match=r"'cut\.safetensors' is truncated"):
        SafetensorsFile(path)


def test_short_and_zero_length_headers_are_refused(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(NotSafetensorsError, match=r"'short\.safetensors' is not a safetensors file"):
        SafetensorsFile(short)
    with pytest.raises(NotSafetensorsError, match=r"'zero\.safetensors' is not a safetensors file"):
        SafetensorsFile(write_raw(tmp_path / "zero.safetensors", None, header_bytes=b"", length=0))


def test_zero_sized_tensors_may_share_an_offset(tmp_path):
    header = {"a": entry(shape=(0,), offsets=(0, 0)), "b": entry(shape=(0, 3), offsets=(0, 0)), "c": entry()}
    file = SafetensorsFile(write_raw(tmp_path / "empty_parts.safetensors", header, bytes(8)))
    assert file["a"].shape == (0,) and file["b"].shape == (0, 3) and file["c"].shape == (2,)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_a_huge_claimed_tensor_allocates_nothing(tmp_path):
    """A small task-vector file claiming a [50000, 50000] fp32 tensor (10 GB) past its end is refused at open;
    before, a merge zero-filled a buffer of the claimed size."""
    header = {
        "__metadata__": {"dm_format": "diffusion-merge/task-vector/1"},
        "diffusion_model.a.diff": entry(shape=(50000, 50000), offsets=(0, 50000 * 50000 * 4)),
    }
    path = write_raw(tmp_path / "claims_10gb.safetensors", header, bytes(1024))
    before = peak_rss_bytes()
    with pytest.raises(NotSafetensorsError, match=r"claims_10gb\.safetensors.*'diffusion_model\.a\.diff'"):
        vector = merging.load_task_vector(path)
        merging.merge_task_vectors([vector, vector], "ties", k=0.5)
    assert peak_rss_bytes() - before < 256 * 1024 * 1024


def test_a_valid_file_still_opens(tmp_path):
    path = tmp_path / "ok.safetensors"
    merging.write_safetensors(path, [("w", torch.float16, (2, 3))], [("w", torch.ones(2, 3))], {"note": "x"})
    file = SafetensorsFile(path)
    assert file.metadata == {"note": "x"} and torch.equal(file["w"], torch.ones(2, 3, dtype=torch.float16))
