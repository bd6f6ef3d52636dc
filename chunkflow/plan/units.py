"""Sizes in bytes and tokens: the one place that reads and writes them (stdlib only).

* :func:`parse_size` reads what users type: ``256K`` tokens, ``80GiB`` or ``80GB`` of memory;
  bare K/M/G/T and KiB/MiB/GiB/TiB are binary, KB/MB/GB/TB decimal, case does not matter.
* :func:`format_bytes` writes bytes in prose (``4.00 GiB``, ``3.0 MiB``: MiB below a GiB, so a
  report's columns keep one unit); :func:`format_size` writes a table cell (``80.0GiB``, and
  token counts as ``8K``).
* :data:`BYTES_PER_ELEMENT`: the bytes of each parameter dtype a config may name.
"""

from __future__ import annotations

import re

from chunkflow.plan.chunks import check_positive_int

BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float64": 8}
"""Bytes per element of the dtypes ``--model.dtype`` resolves to."""

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}


def parse_size(text: str | int) -> int:
    """``"256K"`` -> 262144, ``"80GiB"`` -> 80 * 2**30, ``"80GB"`` -> 80 * 10**9, ``"4096"``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return check_positive_int("size", text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: expected a number with an optional unit, "
                         f"like 256K, 32768, 80GiB or 80GB")
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1 or value != int(value):
        raise ValueError(f"size {text!r} is not a positive whole number of units")
    return int(value)


def format_bytes(num_bytes: float) -> str:
    """Bytes in prose: ``4.00 GiB`` from a GiB up, else ``3.0 MiB``."""
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB"


def format_size(num: float, *, tokens: bool = False) -> str:
    """A table cell: bytes as ``80.0GiB``/``512.0MiB``; ``tokens``: a token count as 8K/256K."""
    if tokens:
        return f"{num // 1024:.0f}K" if num % 1024 == 0 and num >= 1024 else f"{num:.0f}"
    return f"{num / 2**30:.1f}GiB" if num >= 2**30 else f"{num / 2**20:.1f}MiB"
