"""Next-token loss whose value and gradients do not depend on how a batch is chunked.

Labels are shifted over the *whole* sequence before it is cut (the last token of a chunk predicts
the first token of the next), and every token gets a fixed weight computed from the whole global
batch before the first backward:

* ``"token"``: 1 / (number of supervised tokens in the batch), i.e. the token mean of unchunked
  training;
* ``"sequence"``: 1 / (number of sequences with a supervised token * that sequence's supervised
  tokens), i.e. the mean over sequences of each sequence's token mean. A sequence with no
  supervised token has no mean and does not count.

A chunk's loss is then sum(weight * token cross-entropy) over its tokens, and the sum over chunks
is exactly the batch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_NORMALIZATIONS = ("token", "sequence")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF convention: position t is trained to predict labels[t + 1]; the last position nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    return targets


def token_weights(targets: list[torch.Tensor], normalization: str, dtype: torch.dtype, *,
                  totals=None) -> tuple[list[torch.Tensor], int]:
    """Per-token loss weights for each sequence, and the number of supervised tokens.

    ``totals(num_tokens, num_sequences) -> (num_tokens, num_sequences)``: the whole global
    batch's supervised tokens and sequences from these sequences' counts (data parallelism: a
    sum over ranks; each sequence lives whole on one rank). Default: these sequences are all.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss_normalization={normalization!r}; valid: {LOSS_NORMALIZATIONS}")
    masks = [t != IGNORE_INDEX for t in targets]
    counts = [int(m.sum()) for m in masks]
    total, num_seqs = sum(counts), sum(1 for c in counts if c > 0)
    if totals is not None:
        total, num_seqs = totals(total, num_seqs)
    weights = []
    for mask, count in zip(masks, counts):
        if normalization == "token":
            w = 1.0 / total if total else 0.0
        else:
            w = 1.0 / (num_seqs * count) if count else 0.0
        weights.append(mask.to(dtype) * w)
    return weights, total


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """logits (L, V), targets (L,), weights (L,) -> sum_t weight_t * CE_t (computed in fp32+)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.to(acc), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return (ce * weights.to(acc)).sum()
