"""Built-in synthetic data: long-tailed lengths and learnable token streams. No torch needed.

Lengths come from :func:`chunkflow.plan.lengths.sample_lengths` (an LMSys-Chat-1M-like long
tail; re-exported here), the generator the planning tools use too.

Tokens come from a sparse random Markov chain over a small alphabet (token ids 0..num_symbols-1):
each token is followed by one of a few successors, so the entropy rate is log(num_successors)
(2 bits for 4) against 8 bits for uniform bytes. A falling loss means the model learned the
transition table, not just the token frequencies.
"""

from __future__ import annotations

import math
import random

from chunkflow.plan.lengths import sample_lengths  # noqa: F401  (re-exported)


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
