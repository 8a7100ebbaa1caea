"""Reusable memory: the one buffer class every streaming stage uses (reads, staging for writes, merge work).

Freshly allocated multi-megabyte CPU tensors cost more in page faults than the work done on them — each is a
new memory map whose pages fault in one by one (streaming an SDXL checkpoint that way spent most of its time
in the kernel, and converting each tensor for a save into a fresh buffer was a third of the run). A
:class:`Scratch` keeps one buffer per name and dtype, grown to the largest request, and hands out views of
it; on CUDA the caching allocator already does this, and the same class works there too.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


class ByteMemory(Protocol):
    """Where a read lands: ``take(size)`` gives ``size`` bytes, valid until its next use."""

    def take(self, size: int) -> torch.Tensor: ...


class Scratch:
    """Reusable buffers on one device, one per (name, dtype), grown to the largest request; not thread-safe.

    A returned view is valid until the next request under the same name and dtype.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[(name, dtype)] = buffer
        return buffer[:numel].view(shape)

    def take(self, size: int) -> torch.Tensor:
        """``size`` bytes for a file read (:class:`ByteMemory`)."""
        return self.get("bytes", (size,), torch.uint8)

    def copy_as(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` converted to ``dtype`` in this scratch's memory, flattened (one buffer per dtype)."""
        flat = self.get("converted", (tensor.numel(),), dtype)
        flat.view(tensor.shape).copy_(tensor)
        return flat
