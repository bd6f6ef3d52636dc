"""Built-in synthetic data: long-tailed lengths and learnable token streams. No torch needed.

Lengths follow an LMSys-Chat-1M-like long tail, scaled to ``max_len``: about 90% of sequences are
under max_len/32, 8% between max_len/32 and max_len/8, 2% between max_len/8 and max_len (for
max_len = 32K: 90% < 1K, 8% 1K-4K, 2% 4K-32K), log-uniform within each band.

Tokens come from a sparse random Markov chain over a small alphabet (token ids 0..num_symbols-1):
each token is followed by one of a few successors, so the entropy rate is log(num_successors)
(2 bits for 4) against 8 bits for uniform bytes. A falling loss means the model learned the
transition table, not just the token frequencies.
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


class MarkovSource:
    """Token sequences from a fixed sparse random Markov chain over ``num_symbols`` tokens."""

    def __init__(self, num_symbols: int = 32, *, num_successors: int = 4, seed: int = 0):
        if not 1 <= num_successors <= num_symbols:
            raise ValueError(f"num_successors={num_successors} must be in 1..num_symbols="
                             f"{num_symbols}")
        rng = random.Random(seed)
        self.num_symbols = num_symbols
        self.successors = [rng.sample(range(num_symbols), num_successors)
                           for _ in range(num_symbols)]

    @property
    def entropy_nats(self) -> float:
        """Entropy rate: the best achievable mean next-token loss."""
        return math.log(len(self.successors[0]))

    def sample(self, rng: random.Random, length: int) -> list[int]:
        token = rng.randrange(self.num_symbols)
        out = [token]
        for _ in range(length - 1):
            token = rng.choice(self.successors[token])
            out.append(token)
        return out
