"""Sequence parallelism's bookkeeping on one process: the ranks' rows tile the padded chunk, and
attention over a padded chunk equals attention over the chunk (padding rows get zeros); and a
pipeline stage's dropout stream."""

import pytest
import torch

from chunkflow.runtime.attention import get_kernel
from chunkflow.parallel.tensor import SequenceShard
from chunkflow.runtime.chunk_call import BoundSegment, ChunkAttention


@pytest.mark.parametrize("num_tokens,size", [(16, 2), (13, 2), (7, 4), (1, 4), (9, 3)])
def test_the_ranks_rows_tile_the_padded_chunk(num_tokens, size):
    t = torch.arange(num_tokens)
    shards = [SequenceShard(rank, size) for rank in range(size)]
    rows = shards[0].rows(num_tokens)
    assert rows * size >= num_tokens > (rows - 1) * size  # less than one row of padding each
    parts = [s.local(t, -1) for s in shards]
    assert all(len(p) == rows for p in parts)
    whole = torch.cat(parts)
    assert torch.equal(whole, shards[0].padded(t, -1))
    assert torch.equal(whole[:num_tokens], t) and bool((whole[num_tokens:] == -1).all())


def test_attention_leaves_the_padding_rows_out():
    torch.manual_seed(0)
    # two packed sequences of 5 and 6 tokens, padded to 12 rows (tp=4: 3 rows each)
    segments = [BoundSegment(0, 5, 0, None), BoundSegment(5, 6, 0, None)]
    kernel = get_kernel("math", torch.device("cpu"), torch.float64)
    q = torch.randn(1, 4, 12, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True)

    def attend(n):
        return ChunkAttention(segments, kernel, block_size=16, has_successor=False)(
            0, q[:, :, :n], k[:, :, :n], v[:, :, :n])

    padded, plain = attend(12), attend(11)
    assert padded.shape == (1, 4, 12, 8)
    assert torch.equal(padded[:, :, :11], plain) and not padded[:, :, 11:].any()
    grads = torch.autograd.grad(padded.sum(), (q, k, v))
    assert all(not g[:, :, 11:].any() for g in grads)  # the padding gets no gradient
    want = torch.autograd.grad(plain.sum(), (q, k, v))
    assert all(torch.allclose(g, w, rtol=0, atol=1e-12) for g, w in zip(grads, want))


def test_each_pipeline_stage_draws_its_own_dropout_masks_on_cpu():
    """The first stage (one process included) keeps the seed it always had; a later stage gets
    another stream, which the CPU generator (32 bits of a seed) sees too."""
    from chunkflow.runtime.chunk_run import chunk_seed

    def masks(seed):
        torch.manual_seed(seed)
        return torch.rand(64)

    step_seed = 2**61 + 12345
    assert chunk_seed(step_seed, 7, 0) == step_seed + 7
    first, later = masks(chunk_seed(step_seed, 7, 0)), masks(chunk_seed(step_seed, 7, 2))
    assert not torch.equal(first, later)
    assert all(0 <= chunk_seed(2**62 - 1, 10**6, layer) < 2**64 for layer in (0, 1, 80))
