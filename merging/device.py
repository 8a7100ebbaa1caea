"""Where per-key work runs: CUDA when present, else the CPU; and which code path suits the device."""

from __future__ import annotations

import torch


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def batched_kernels(device: torch.device) -> bool:
    """Whether to use the launch-light code paths (one kernel per chunk, not per key; selections by counting
    instead of ``torch.kthvalue``, whose CUDA kernel gives each row to a single thread block).

    True on accelerators, where launches and host synchronisations dominate; the CPU keeps the paths that
    are fastest there. Both paths give identical results (the tests run the batched one on the CPU too).
    """
    return device.type != "cpu"


def runs_ahead(device: torch.device) -> bool:
    """Whether work on ``device`` is queued and runs while the host goes on (CUDA), so that the host should
    read results back one chunk late instead of waiting for each chunk to finish."""
    return device.type == "cuda"


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Small host data (a list) as a tensor on ``device`` without waiting for the device.

    A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait
    for everything queued on the stream; from pinned memory the copy is queued like a kernel.
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
