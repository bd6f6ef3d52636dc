"""What every benchmarked method trains: one model shape and the same LMSys-like global batches.

A global batch at maximum length ``max_len`` holds one sequence of exactly ``max_len`` tokens (so
every step meets the longest length the sweep names) and ``num_sequences - 1`` lengths from
:func:`chunkflow.plan.lengths.sample_lengths`. Each sequence is an SFT example: its first 10-50%
tokens are the prompt (labels -100), the rest are supervised. Token ids are uniform random;
their values do not change the work.

FLOPs follow :func:`chunkflow.plan.cost.forward_flops` (matmuls 2 per parameter and token,
causal attention per sequence, the output head); a training pass is the standard 3 x forward,
and each recomputation adds one forward of the decoder layers.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from chunkflow.models.config import ModelConfig
from chunkflow.plan.cost import ModelShape, attention_pairs, forward_flops
from chunkflow.plan.lengths import sample_lengths
from chunkflow.runtime.loss import IGNORE_INDEX

MODELS: dict[str, ModelConfig] = {
    # CPU: 2 layers keep a 32K-token step at ~20 s on 2 cores. Vocabulary 512 keeps the logits'
    # share of activation memory near a real 7B model's (~10%): a big vocabulary on a narrow
    # model would make the unchunked methods' logits dominate their memory.
    "cpu": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=352,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # GPU: Qwen2.5-0.5B's layer shape (untied, 8 of its 24 layers, Llama-style without biases).
    "gpu": ModelConfig(vocab_size=32768, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=8, num_attention_heads=14, num_key_value_heads=2),
}


def get_model_config(name: str) -> ModelConfig:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}") from None


def batch_lengths(max_len: int, num_sequences: int, *, seed: int) -> list[int]:
    """One sequence of ``max_len`` at a random place among ``num_sequences - 1`` LMSys-like ones."""
    if num_sequences < 1:
        raise ValueError(f"num_sequences={num_sequences}: a global batch needs at least 1")
    rng = random.Random(seed)
    lengths = sample_lengths(rng, num_sequences - 1, max_len=max_len)
    lengths.insert(rng.randrange(num_sequences), max_len)
    return lengths


def global_batch(max_len: int, num_sequences: int, *, seed: int, vocab_size: int) -> list[dict]:
    """The ``seed``-th global batch: dicts of ``input_ids`` and ``labels`` (prompt masked)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = []
    for n in batch_lengths(max_len, num_sequences, seed=seed):
        ids = torch.randint(0, vocab_size, (n,), generator=gen)
        labels = ids.clone()
        labels[: int(n * rng.uniform(0.1, 0.5))] = IGNORE_INDEX
        batch.append({"input_ids": ids, "labels": labels})
    return batch


def count_tokens(batch: Sequence[dict]) -> tuple[int, int]:
    """(tokens, supervised tokens) of a batch; a token is supervised when the *next* label is."""
    total = sum(len(ex["input_ids"]) for ex in batch)
    supervised = sum(int((ex["labels"][1:] != IGNORE_INDEX).sum()) for ex in batch)
    return total, supervised


def forward(shape: ModelShape, segment_lens: Sequence[int], *, prefix_len: int = 0,
            head: bool = True, dense_attention: bool = False) -> float:
    """Forward FLOPs of one pass over packed segments (the first after ``prefix_len`` keys).

    ``dense_attention``: attention under a dense (T x T) mask, which computes all T^2 pairs of
    the T tokens whether masked or not.
    """
    f = forward_flops(shape, list(segment_lens), prefix_len=prefix_len, head=head)
    attention = f.attention
    if dense_attention:
        t = sum(segment_lens)
        attention *= t * t / attention_pairs(segment_lens, prefix_len)
    return float(f.layers_matmul + f.head_matmul + attention)


def model_flops(shape: ModelShape, lengths: Sequence[int]) -> float:
    """The useful work of training on these sequences: 3 x their forward, nothing recomputed."""
    return sum(3 * forward(shape, [n]) for n in lengths)
