"""Which file is this? Content hashes for recipe inputs, cheap enough for 24 GB checkpoints.

``dmh1`` (always recorded) is the SHA-256 of: the tag ``dmh1``, the file size, the safetensors header
(its length prefix and JSON, which name every tensor with its dtype, shape and byte offsets) and the
tensor data — all of it for files up to 64 MiB (LoRAs, task vectors of small models, tiny test models),
else 64 blocks of 64 KiB spread evenly from the first byte of data to the last. It reads at most 4 MiB
plus the header whatever the file size (milliseconds for a Flux checkpoint, where a whole-file SHA-256
reads 24 GB), and a different fine-tune, an other dtype, a pruned or re-saved file all change it: a
fine-tune changes nearly every weight, so every sampled block. What it cannot see is an edit confined to
the bytes between samples; ``sha256`` (optional, the whole file — the hash model sites such as Civitai
show as "SHA256") closes that gap at the cost of reading everything, and is checked whenever a recipe
records it.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

HASH_NAME = "dmh1"
WHOLE_DATA_LIMIT = 64 << 20
SAMPLE_COUNT = 64
SAMPLE_BYTES = 64 << 10
_READ_BYTES = 16 << 20


def sampled_hash(path: str | os.PathLike) -> str:
    """The ``dmh1`` hash of a safetensors file (see the module docstring)."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"'{path.name}' is not a safetensors file (too short)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise ValueError(f"'{path.name}' is not a safetensors file (its header length exceeds the file)")
        digest = hashlib.sha256(HASH_NAME.encode())
        digest.update(size.to_bytes(8, "little"))
        digest.update(prefix)
        digest.update(handle.read(header_length))
        data_start = 8 + header_length
        data_length = size - data_start
        if data_length <= WHOLE_DATA_LIMIT:
            while block := handle.read(_READ_BYTES):
                digest.update(block)
        else:
            last = data_length - SAMPLE_BYTES
            for index in range(SAMPLE_COUNT):
                handle.seek(data_start + index * last // (SAMPLE_COUNT - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def full_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileOrigin:
    """A file an object was read from, with the size and modification time it had when it was opened, so
    that a recipe written later can tell whether the file still holds what was read."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileOrigin:
        path = Path(path).resolve()
        stat = path.stat()
        return cls(path, stat.st_size, stat.st_mtime_ns)

    def changed(self) -> bool:
        try:
            stat = self.path.stat()
        except OSError:
            return True
        return (stat.st_size, stat.st_mtime_ns) != (self.size, self.mtime_ns)


def identity(path: str | os.PathLike, full: bool = False) -> dict:
    """{"file", "bytes", "dmh1"[, "sha256"]}: how a recipe names one input file."""
    path = Path(path)
    entry = {"file": path.name, "bytes": path.stat().st_size, HASH_NAME: sampled_hash(path)}
    if full:
        entry["sha256"] = full_hash(path)
    return entry
