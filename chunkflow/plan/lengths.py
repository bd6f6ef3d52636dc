"""Sequence lengths with an LMSys-Chat-1M-like long tail, stdlib only.

Scaled to ``max_len``: about 90% of sequences are under max_len/32, 8% between max_len/32 and
max_len/8, 2% between max_len/8 and max_len (for max_len = 32K: 90% < 1K, 8% 1K-4K, 2% 4K-32K),
log-uniform within each band. The trainer's built-in data, the benchmarks, the cost model and the
auto-tuner all draw from this one generator.
"""

from __future__ import annotations

import math
import random

# (probability, low, high) as fractions of max_len
_BANDS = ((0.90, None, 1 / 32), (0.08, 1 / 32, 1 / 8), (0.02, 1 / 8, 1.0))


def sample_lengths(rng: random.Random, num: int, *, max_len: int, min_len: int = 8) -> list[int]:
    """``num`` sequence lengths from the long-tailed mixture, each in [min_len, max_len]."""
    if max_len < min_len:
        raise ValueError(f"max_len={max_len} must be at least min_len={min_len}")
    lengths = []
    for _ in range(num):
        u, acc = rng.random(), 0.0
        for p, lo, hi in _BANDS:
            acc += p
            if u < acc or hi == 1.0:
                break
        lo_len = min_len if lo is None else max(min_len, int(lo * max_len))
        hi_len = max(lo_len, int(hi * max_len))
        lengths.append(int(math.exp(rng.uniform(math.log(lo_len), math.log(hi_len + 1)))))
    return [min(max(n, min_len), max_len) for n in lengths]


def parse_lengths(text: str) -> list[int]:
    """``--lengths``: ``9000,300,120``; ``LENGTHxCOUNT`` repeats a length (``262144,3000x255``)."""
    lengths = []
    for item in text.split(","):
        length, _, count = item.strip().partition("x")
        try:
            length, count = int(length), int(count) if count else 1
        except ValueError:
            length = count = 0
        if length < 1 or count < 1:
            raise ValueError(f"--lengths {text!r}: {item.strip()!r} is not a positive length or "
                             f"LENGTHxCOUNT; valid: comma-separated, like 9000,300,120 or "
                             f"262144,3000x255")
        lengths += [length] * count
    return lengths
