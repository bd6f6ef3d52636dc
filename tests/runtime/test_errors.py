"""Bad input raises ValueError naming the offending value and what would be valid."""

import pytest
import torch

from chunkflow import ChunkFlowEngine
from tests.conftest import tiny_model

MODEL = tiny_model(dtype=torch.float32)  # vocab_size 53


def _engine(**kw):
    return ChunkFlowEngine(MODEL, **{"chunk_size": 4, **kw})


@pytest.mark.parametrize("batch, match", [
    ([], "non-empty list"),
    (torch.tensor([1, 2, 3]), "non-empty list"),
    ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], r"batch\[1\] is an empty sequence"),
    ([torch.tensor([1, 53, 2])], r"token id 53 at position 1 .*0\.\.52"),
    ([torch.tensor([1, -4])], r"token id -4 at position 1"),
    ([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2])}],
     r"labels shape \(2,\) differs from input_ids shape \(3,\)"),
    ([{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 99])}],
     r"labels: token id 99 .*or -100"),
    ([{"labels": torch.tensor([1, 2])}], "'input_ids' is required"),
    ([torch.tensor([[1, 2], [3, 4]])], r"shape \(2, 2\); each sequence must be 1-D"),
    ([torch.tensor([1.0, 2.0])], "must be integers"),
])
def test_bad_batch(batch, match):
    with pytest.raises(ValueError, match=match):
        _engine().forward_backward(batch)


@pytest.mark.parametrize("kw, match", [
    (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
    (dict(chunk_size=-5), "chunk_size must be a positive integer, got -5"),
    (dict(k=0), "k must be a positive integer, got 0"),
    (dict(loss_normalization="mean"), r"loss_normalization='mean'.*token, sequence"),
    (dict(attention_backend="flash"), r"attention_backend='flash'"),
])
def test_bad_engine_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        _engine(**kw)


def test_accepts_lists_tensors_dicts_and_2d_batches():
    ids = [[1, 2, 3, 4, 5], [6, 7]]
    results = [
        _engine().forward_backward([torch.tensor(x) for x in ids]),
        _engine().forward_backward([{"input_ids": x} for x in ids]),
        _engine().forward_backward(ids),
    ]
    assert len({float(r.loss) for r in results}) == 1
    assert _engine().forward_backward(torch.tensor([[1, 2, 3], [4, 5, 6]])).num_tokens == 6
    assert results[0].num_loss_tokens == 4 + 1 and results[0].num_chunks == 2
