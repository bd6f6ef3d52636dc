"""The background prefetcher yields the stream's items unchanged, raises the stream's errors where
the stream would have, and stops when closed; a run with it trains bit for bit as one without."""

import itertools
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from chunkflow.cli import main
from chunkflow.train.data.prefetch import Prefetcher
from tests.train.run.test_trainer import args, metrics


def test_items_come_in_order_and_an_error_where_the_stream_raised_it():
    def stream():
        yield from range(5)
        raise ValueError("data.jsonl:6: malformed JSON")

    got = []
    with pytest.raises(ValueError, match="data.jsonl:6"):
        for item in Prefetcher(stream(), depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]
    assert list(Prefetcher(iter(range(7)), depth=3)) == list(range(7))


def test_the_producer_stays_at_most_depth_ahead_and_stops_when_closed():
    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    before = threading.active_count()
    prefetch = Prefetcher(endless(), depth=2)
    assert next(prefetch) == 0
    time.sleep(0.3)
    # one taken, two queued, one more waiting to be queued
    assert len(produced) <= 4, produced
    prefetch.close()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(prefetch)
    with pytest.raises(ValueError, match="depth=0"):
        Prefetcher(iter(()), depth=0)


def test_a_run_with_prefetching_trains_as_one_without(tmp_path):
    for depth in (0, 3):
        assert main(["train", *args(tmp_path / f"p{depth}", **{"train.steps": "4",
                                                                "data.prefetch": str(depth)})]) == 0
    a, b = (load_file(tmp_path / f"p{d}" / "step-00000004" / "model.safetensors") for d in (0, 3))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ([r["loss"] for r in metrics(tmp_path / "p0")]
            == [r["loss"] for r in metrics(tmp_path / "p3")])
