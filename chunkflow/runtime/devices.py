"""Devices as keys, and which host<->device copies are really asynchronous.

* :func:`normalize_device`: a device with its index. ``torch.device("cuda")`` and
  ``torch.device("cuda:0")`` compare unequal, yet are one GPU; every comparison of devices and
  every dict keyed by a device in the runtime goes through this, or a counter kept for
  ``cuda:0`` is missed when asked for as ``cuda``.
* :func:`copy_is_async`: ``non_blocking=True`` between CUDA and pageable host memory is a
  synchronous copy (the driver stages it through its own pinned buffer before the call
  returns), so an overlap planned around it silently does not happen. Only pinned, contiguous
  host memory copies asynchronously.
"""

from __future__ import annotations

import torch


def normalize_device(device) -> torch.device:
    """``device`` (a torch.device or string) with its index: ``cuda`` -> ``cuda:<current>``.

    Where CUDA is unavailable (a CPU machine) ``cuda`` is ``cuda:0``, without calling into
    CUDA, so devices can be compared and used as keys in CPU tests."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", index)
    return device


def copy_is_async(host: torch.Tensor, device) -> bool:
    """Whether a ``non_blocking`` copy between ``host`` and ``device`` really is asynchronous:
    a CUDA device, and pinned, contiguous host memory. (torch copies a strided host tensor
    through a contiguous temporary in pageable memory, so a copy of a strided view of pinned
    memory is synchronous too.)"""
    return (torch.device(device).type == "cuda" and host.device.type == "cpu"
            and host.is_pinned() and host.is_contiguous())
