"""Streamed safetensors reading and writing.

The reader parses the safetensors header itself and reads one tensor at a time with plain file reads
instead of memory-mapping the whole file: a memory map keeps every page it touched resident in the
process, so streaming two SDXL checkpoints through ``safe_open`` would grow the resident set to the size
of both files. Nothing here unpickles anything; a file that is not safetensors is refused.

Streaming reads (a tensor read into a reused buffer: task-vector extraction, merges from files) drop the
pages they read from the page cache right behind them (``posix_fadvise(DONTNEED)``). A merge reads inputs
larger than RAM once or twice, so the cache would rarely serve a second read, and keeping it full makes the
kernel reclaim pages during every read: on the 2-core benchmark machine a cold 5.1 GB read took 21.4 s
(8.5 s system time) through a growing cache and 4.2 s (0.8 s) with drop-behind. Each file keeps one
descriptor, so the kernel's readahead follows a streaming pass from tensor to tensor.

A file's header is validated when it is opened (nothing is sized from it before), and every read first checks
that the file still has the size, modification time and inode it had then: a file overwritten in place under
an open reader would otherwise be read at its old offsets, which gives plausible but wrong tensors.

The writer knows every key's dtype and shape in advance (task vectors and merges know them without
computing anything), writes the header first and then each tensor as it is produced, into a hidden partial
file (locked while it is written) that replaces the target only when complete. A save that is killed leaves
its partial file behind; the next save into the same folder removes such files once no writer holds them.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .buffers import ByteMemory, Scratch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_MAX_HEADER_BYTES = 100 * 1024 * 1024
DROP_BEHIND_MIN_BYTES = 1 << 20


class NotSafetensorsError(ValueError):
    """The file is not a readable safetensors file (it is never unpickled)."""


class StaleFileError(RuntimeError):
    """A file changed on disk after it was opened: its header no longer describes its bytes."""


def _stat_signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten in place or replaced: size, modification time, inode."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev


def file_fingerprint(path: str | os.PathLike) -> str:
    """Size, modification time, inode and a hash of the header of a file: different whenever the file was
    rewritten or replaced (for caches such as ComfyUI's, which must not reuse what an old file gave)."""
    path = Path(path)
    stat = path.stat()
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        header = handle.read(min(length, _MAX_HEADER_BYTES))
    digest = hashlib.sha256(prefix + header).hexdigest()[:16]
    return "-".join(str(part) for part in (*_stat_signature(stat), digest))


class SafetensorsFile(Mapping[str, torch.Tensor]):
    """A read-only key→tensor mapping over a safetensors file; each lookup reads one tensor from disk."""

    def __init__(self, path: str | os.PathLike, drop_behind: bool = True):
        """``drop_behind``: after a large tensor is read into a caller's buffer (the streaming paths), tell
        the kernel its pages are no longer needed (see the module notes)."""
        self._handle: io.BufferedReader | None = None
        self._lock = threading.Lock()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: '{self.path}'")
        self._signature = _stat_signature(self.path.stat())
        self._entries, self.metadata, self._data_start, raw_header = _read_header(self.path)
        self.header_digest = hashlib.sha256(raw_header).hexdigest()
        self.drop_behind = drop_behind and hasattr(os, "posix_fadvise")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def read(self, key: str, buffer: ByteMemory | None = None) -> torch.Tensor:
        """One tensor; with ``buffer`` it lands in that reused memory, valid until the buffer's next use."""
        dtype, shape, (begin, end) = self._entry(key)
        return self._read(dtype, shape, begin, end, buffer)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        # Mapping's default __contains__ calls __getitem__, which would read the whole tensor.
        return key in self._entries

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)[1])

    def dtype_of(self, key: str) -> torch.dtype:
        return self._entry(key)[0]

    def head(self, key: str, count: int) -> torch.Tensor:
        """The first ``count`` elements of a tensor (flattened), read without reading the rest."""
        dtype, shape, (begin, _end) = self._entry(key)
        count = min(count, math.prod(shape))
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self._read(dtype, (count,), begin, begin + count * itemsize)

    def _entry(self, key: str):
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"'{self.path.name}' has no tensor '{key}'") from None

    def _read(self, dtype: torch.dtype, shape, begin: int, end: int, buffer: ByteMemory | None = None) -> torch.Tensor:
        start, size = self._data_start + begin, end - begin
        raw = buffer.take(size) if buffer is not None else torch.empty(size, dtype=torch.uint8)
        if size:
            with self._lock:
                self.check_unchanged()
                handle = self._open()
                handle.seek(start)
                if handle.readinto(raw.numpy()) != size:  # type: ignore[arg-type]  # ndarray is a writable buffer
                    raise NotSafetensorsError(f"'{self.path.name}' is truncated")
                if buffer is not None and self.drop_behind and size >= DROP_BEHIND_MIN_BYTES:
                    os.posix_fadvise(handle.fileno(), start, size, os.POSIX_FADV_DONTNEED)
        return raw.view(dtype).reshape(shape)

    def check_unchanged(self) -> None:
        """Raise :class:`StaleFileError` when the file was rewritten, replaced or removed since it was opened:
        reading it with the old header would return other bytes than the tensors it names."""
        try:
            now = _stat_signature(self.path.stat())
        except FileNotFoundError:
            raise StaleFileError(
                f"'{self.path.name}' was removed or renamed after it was opened; run the workflow again"
            ) from None
        if now != self._signature:
            self.close()
            raise StaleFileError(
                f"'{self.path.name}' changed on disk after it was opened (size or modification time differ): "
                "its old header would read wrong values. Run the workflow again to read the new file, and "
                "do not overwrite model files while a workflow uses them."
            )

    def _open(self) -> io.BufferedReader:
        """One open file for all reads, so the kernel's readahead follows a pass from tensor to tensor.
        On Windows an open file cannot be replaced or deleted, so there each read opens it anew."""
        if self._handle is None or os.name == "nt":
            self.close()
            self._handle = open(self.path, "rb")  # noqa: SIM115 - kept open across reads, closed by close()
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __del__(self):
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def as_float32(tensor: torch.Tensor, buffer: ByteMemory) -> torch.Tensor:
    """``tensor`` in fp32: itself, or on the CPU a copy in ``buffer`` (valid until the buffer's next use).

    Upcast explicitly before mixing dtypes: on the CPU an in-place ``fp32.sub_(fp16)`` allocates a hidden
    fp32 copy of the fp16 operand and runs ~7x slower than ``copy_`` into reused memory + an fp32 op.
    """
    if tensor.dtype == torch.float32:
        return tensor
    if tensor.device.type != "cpu":
        return tensor.to(torch.float32)
    return buffer.take(tensor.numel() * 4).view(torch.float32).view(tensor.shape).copy_(tensor)


@runtime_checkable
class KnowsShapes(Protocol):
    """A key → tensor mapping that tells a tensor's shape without reading it (the least a lazy mapping offers)."""

    def __getitem__(self, key: str) -> torch.Tensor: ...

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, without reading it."""
        ...


@runtime_checkable
class LazyTensors(KnowsShapes, Protocol):
    """A key → tensor mapping that can answer without materialising whole tensors: safetensors files, renamed
    views of them, a MODEL's patched weights. Plain dicts of tensors are the other kind of mapping the library
    takes; the helpers :func:`read_tensor`, :func:`shape_of` and :func:`head_of` accept both (and a mapping that
    only :class:`KnowsShapes`)."""

    def read(self, key: str, buffer: ByteMemory) -> torch.Tensor:
        """The tensor, read into ``buffer`` where it comes from a file (valid until the buffer's next use)."""
        ...

    def head(self, key: str, count: int) -> torch.Tensor:
        """The first ``count`` values of the flattened tensor, reading no more than those."""
        ...


def read_tensor(mapping: Mapping[str, torch.Tensor], key: str, buffer: ByteMemory) -> torch.Tensor:
    """``mapping[key]``, read into ``buffer`` when the mapping reads files (valid until the buffer's next use)."""
    if isinstance(mapping, LazyTensors):
        return mapping.read(key, buffer)
    return mapping[key]


def head_of(mapping: Mapping[str, torch.Tensor], key: str, count: int) -> torch.Tensor:
    """The first ``count`` values of the flattened ``mapping[key]`` (only those are read from a file)."""
    if isinstance(mapping, LazyTensors):
        return mapping.head(key, count)
    return mapping[key].reshape(-1)[:count]


def _read_header(path: Path):
    """(entries, metadata, data start, raw header bytes) of a safetensors file, every entry validated.

    Nothing is allocated from a header value before it is checked against the file: a header is only
    trusted once every tensor's dtype is known, its shape is a list of non-negative integers, its byte
    span equals numel × item size, lies inside the file and overlaps no other tensor's span.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise NotSafetensorsError(f"'{path.name}' is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len == 0 or header_len > _MAX_HEADER_BYTES:
            raise NotSafetensorsError(
                f"'{path.name}' is not a safetensors file (pickled .ckpt/.pt files are refused; convert them "
                "to .safetensors first)"
            )
        if header_len > size - 8:
            raise NotSafetensorsError(
                f"'{path.name}' is truncated: its header says {header_len} bytes but the file holds {size - 8} "
                "after the length field"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotSafetensorsError(f"'{path.name}' is not a safetensors file (unreadable header)") from None
    except _DuplicateKey as duplicate:
        raise NotSafetensorsError(f"'{path.name}': the header names '{duplicate.key}' twice") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError(f"'{path.name}' is not a safetensors file (header is not a table)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NotSafetensorsError(f"'{path.name}': the header's __metadata__ is not a table of strings")
    data_size = size - 8 - header_len
    entries = {key: _checked_entry(path.name, key, info, data_size) for key, info in header.items()}
    _check_no_overlap(path.name, entries)
    return entries, metadata, 8 + header_len, raw


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    table = {}
    for key, value in pairs:
        if key in table:
            raise _DuplicateKey(key)
        table[key] = value
    return table


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_entry(filename: str, key: str, info: object, data_size: int):
    """(dtype, shape, (begin, end)) of one header entry, or NotSafetensorsError naming file and key."""

    def refuse(problem: str) -> NotSafetensorsError:
        return NotSafetensorsError(f"'{filename}': tensor '{key}' {problem}; the file is damaged or not safetensors")

    if not isinstance(info, dict):
        raise refuse("has no dtype/shape/data_offsets entry")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise refuse(f"has unsupported dtype {dtype_name!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise refuse(f"has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise refuse(f"has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise refuse(f"has data_offsets [{begin}, {end}] that end before they begin")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise refuse(f"is {shape} {dtype_name} ({expected} bytes) but its data_offsets span {end - begin} bytes")
    if end > data_size:
        raise refuse(f"ends at byte {end} of the data, but the file holds {data_size} bytes of data (truncated?)")
    return dtype, tuple(shape), (begin, end)


def _check_no_overlap(filename: str, entries: dict) -> None:
    spans = sorted((begin, end, key) for key, (_, _, (begin, end)) in entries.items() if end > begin)
    for (_, previous_end, previous), (begin, _, key) in itertools.pairwise(spans):
        if begin < previous_end:
            raise NotSafetensorsError(
                f"'{filename}': tensors '{previous}' and '{key}' overlap in the file (byte {begin} belongs to "
                "both); the file is damaged or not safetensors"
            )


def shape_of(mapping: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape without reading it when the mapping can tell (files), else from the tensor."""
    if isinstance(mapping, KnowsShapes):
        return mapping.shape_of(key)
    return tuple(mapping[key].shape)


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
    overflow: str = "error",
) -> Path:
    """Write tensors to ``path`` one at a time, atomically.

    ``specs`` lists (key, dtype, shape) in the order ``tensors`` will yield them; each yielded tensor is
    checked against its spec, converted to the spec's dtype and written before the next is produced.
    ``progress`` is called with the number of tensors written so far. The file appears under its final
    name only when everything was written.

    Floating-point values must fit the dtype they are stored in: a tensor holding NaN/Inf, or values beyond
    the dtype's largest finite value (65504 for fp16, 448 for fp8 e4m3fn), stops the write with a ValueError
    naming the key, and nothing is written. ``overflow="clamp"`` stores such values as the nearest finite
    value instead (logged with the keys); NaN/Inf are refused either way.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, not {overflow!r}")
    path = Path(path)
    specs = list(specs)
    header, data_size = _header_for(specs, metadata)
    remove_stale_partials(path.parent)
    descriptor, temporary = new_partial_file(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(struct.pack("<Q", len(header)))
            handle.write(header)
            written = _write_tensors(handle, specs, tensors, progress, overflow)
            if written != data_size:
                raise RuntimeError(f"wrote {written} bytes of tensor data, expected {data_size}")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# -- partial files of interrupted saves ---------------------------------------------------------------

PARTIAL_SUFFIX = ".dm-partial"
_PARTIAL_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}" + re.escape(PARTIAL_SUFFIX) + "$")
_LEGACY_PARTIAL_NAME = re.compile(r"^\..+\.safetensors\.[a-z0-9_]{8}\.tmp$")  # earlier versions
PARTIAL_MIN_AGE_S = 60.0
LEGACY_PARTIAL_MIN_AGE_S = 24 * 3600.0


def new_partial_file(target: Path) -> tuple[int, Path]:
    """(descriptor, path) of a new hidden partial file beside ``target``, exclusively locked for as long as the
    descriptor stays open: the kernel drops the lock when the writer dies, which is how
    :func:`remove_stale_partials` tells a live save from a killed one. Every writer of the pack uses these."""
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
    except BaseException:
        os.close(descriptor)
        Path(temporary).unlink(missing_ok=True)
        raise
    return descriptor, Path(temporary)


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the partial files that killed saves of this writer left in ``folder``; returns what was removed.

    Only names this writer creates (``.<target>.<8 random characters>.dm-partial``, and the ``….tmp`` names of
    earlier versions) are considered, never a symlink, never one modified in the last minute, and never one a
    live writer holds locked (earlier versions took no lock: their files must be a day old). Each removal is
    logged. Problems are logged and skipped: a save never fails because of this.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        legacy = bool(_LEGACY_PARTIAL_NAME.match(entry.name))
        if not (legacy or _PARTIAL_NAME.match(entry.name)):
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
            old_enough = now - stat.st_mtime >= (LEGACY_PARTIAL_MIN_AGE_S if legacy else PARTIAL_MIN_AGE_S)
            if entry.is_file(follow_symlinks=False) and old_enough and _remove_if_unlocked(Path(entry.path), stat):
                removed.append(Path(entry.path))
                logger.info(
                    "removed '%s' (%.1f MB), left behind by a save that was interrupted",
                    entry.path,
                    stat.st_size / 1e6,
                )
        except OSError as error:
            logger.warning("could not remove the stale partial file '%s': %s", entry.path, error)
    return removed


def _remove_if_unlocked(path: Path, stat: os.stat_result) -> bool:
    """Unlink ``path`` while holding its lock, if no writer holds it and it is still the file that was listed."""
    if fcntl is None:  # Windows: a file a live writer has open cannot be deleted, so unlink fails for it
        path.unlink()
        return True
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live save is writing it
        current = os.fstat(descriptor)
        if (current.st_ino, current.st_dev) != (stat.st_ino, stat.st_dev):
            return False
        path.unlink()
        return True
    finally:
        os.close(descriptor)


def _header_for(specs, metadata) -> tuple[bytes, int]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), offset


def _write_tensors(handle, specs, tensors, progress, overflow: str) -> int:
    written = 0
    produced = iter(tensors)
    staging = Scratch()
    clamped: list[str] = []
    for done, (key, dtype, shape) in enumerate(specs, start=1):
        try:
            got_key, tensor = next(produced)
        except StopIteration:
            raise RuntimeError(f"tensor stream ended before '{key}'") from None
        if got_key != key or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"expected '{key}' {tuple(shape)}, got '{got_key}' {tuple(tensor.shape)}")
        data = staging.copy_as(tensor.detach(), dtype)
        if dtype.is_floating_point and not _fits(tensor.detach(), data, dtype):
            problem = _range_problem(tensor.detach(), dtype)
            if overflow != "clamp" or problem.startswith("holds NaN/Inf"):
                raise ValueError(
                    f"tensor '{key}' ({done} of {len(specs)}) {problem}; nothing was written. "
                    + (_NONFINITE_ADVICE if problem.startswith("holds NaN/Inf") else _OVERFLOW_ADVICE)
                )
            limit = torch.finfo(dtype).max
            data.view(shape).copy_(tensor.detach().to(torch.float32).clamp(-limit, limit))
            clamped.append(key)
        if data.numel():
            handle.write(data.view(torch.uint8).numpy().data)
        written += data.numel() * data.element_size()
        if progress is not None:
            progress(done)
    if clamped:
        logger.warning(
            "%d tensor(s) had values beyond their storage dtype's range and were clamped to it: %s",
            len(clamped),
            ", ".join(f"'{key}'" for key in clamped[:5]) + (" …" if len(clamped) > 5 else ""),
        )
    return written


OVERFLOW_POLICIES = ("error", "clamp")
_FLOAT8 = tuple(dtype for name, dtype in SAFETENSORS_DTYPES.items() if name.startswith("F8"))
_OVERFLOW_ADVICE = (
    "Store it in a wider dtype (bf16 or fp32), scale the change down, or choose to clamp out-of-range values "
    "(overflow = clamp) to store the nearest representable ones."
)
_NONFINITE_ADVICE = "The values are broken upstream (a diverged training, a NaN input model); they cannot be stored."


def _fits(source: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of ``source`` is finite and representable in ``dtype`` (``stored`` is its copy in
    ``dtype``). fp16/bf16/fp32 turn an overflow into ±Inf, so the stored copy tells; fp8 conversion saturates
    silently, so there the source is measured."""
    if dtype in _FLOAT8:
        largest = _largest_magnitude(source)
        return math.isfinite(largest) and largest <= torch.finfo(dtype).max
    # One aminmax pass (NaN and ±Inf propagate into it): ~0.1 ns per entry on the CPU, where a float32 sum of
    # the fp16 copy costs ~5 ns and an elementwise isfinite ~10 ns.
    return math.isfinite(_largest_magnitude(stored))


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |x| (NaN when any entry is NaN, inf when any is ±inf); 0 for an empty tensor."""
    if not tensor.numel():
        return 0.0
    if tensor.dtype in _FLOAT8:
        tensor = tensor.to(torch.float16)
    low, high = (float(value) for value in torch.aminmax(tensor))
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def check_storable(tensors: Mapping[str, torch.Tensor], what: str = "the tensors") -> None:
    """Refuse in-memory tensors holding NaN/Inf before any of them is written, naming every such key."""
    broken = [
        key
        for key, tensor in tensors.items()
        if tensor.is_floating_point() and not math.isfinite(_largest_magnitude(tensor.detach()))
    ]
    if broken:
        shown = ", ".join(f"'{key}'" for key in broken[:5]) + (f" (+{len(broken) - 5} more)" if len(broken) > 5 else "")
        raise ValueError(
            f"{len(broken)} of the {len(tensors)} tensors of {what} hold NaN/Inf values: {shown}; nothing was "
            f"written. {_NONFINITE_ADVICE}"
        )


def _range_problem(source: torch.Tensor, dtype: torch.dtype) -> str:
    largest = _largest_magnitude(source)
    if not math.isfinite(largest):
        return "holds NaN/Inf values"
    name = _STORAGE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return f"has values up to |x| = {largest:.4g}, beyond the largest {name} value ({torch.finfo(dtype).max:.6g})"


_STORAGE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float8_e4m3fn: "fp8_e4m3fn",
    torch.float8_e5m2: "fp8_e5m2",
}


def parse_dtype(name: str) -> torch.dtype:
    """'fp16' / 'bf16' / 'fp32' / 'fp8_e4m3fn' … → torch dtype."""
    aliases = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp8_e4m3fn": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2,
    }
    try:
        return aliases[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; use one of {sorted(aliases)}") from None


class RenamedMapping(Mapping[str, torch.Tensor]):
    """A view of another mapping under new key names ({new: old}); shape and head lookups pass through."""

    def __init__(self, inner: Mapping[str, torch.Tensor], names: Mapping[str, str]):
        self._inner = inner
        self._names = dict(names)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._inner[self._names[key]]

    def read(self, key: str, buffer: ByteMemory) -> torch.Tensor:
        return read_tensor(self._inner, self._names[key], buffer)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def shape_of(self, key: str) -> tuple[int, ...]:
        return shape_of(self._inner, self._names[key])

    def head(self, key: str, count: int) -> torch.Tensor:
        return head_of(self._inner, self._names[key], count)
