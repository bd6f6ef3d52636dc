"""CUDA semantics that CPU runs hide, checked without a GPU.

* ``torch.device("cuda")`` and ``torch.device("cuda:0")`` compare unequal: the engine's copier
  (whose counters tell what offloading moved) must be one object for both.
* A ``non_blocking`` copy between CUDA and pageable (or strided) host memory is synchronous:
  the copier refuses pageable host memory instead of silently losing the overlap, and its host
  buffers are pinned on CUDA.
"""

import pytest
import torch

from chunkflow import ChunkFlowEngine
from chunkflow.runtime.devices import copy_is_async, normalize_device
from chunkflow.runtime.kv_state import Copier
from tests.conftest import tiny_model


def test_cuda_is_normalised_to_its_index_without_calling_into_cuda(monkeypatch):
    def no_cuda():
        raise AssertionError("called into CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    assert normalize_device("cuda") == torch.device("cuda:0")
    assert normalize_device(torch.device("cuda")) == torch.device("cuda", 0)
    assert normalize_device("cuda:1") == torch.device("cuda:1")
    assert normalize_device("cpu") == torch.device("cpu")


def test_cuda_is_the_current_device_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert normalize_device("cuda") == torch.device("cuda:3")
    assert normalize_device("cuda:0") == torch.device("cuda:0")  # an explicit index stays


def test_the_engine_has_one_copier_for_cuda_and_cuda_0():
    """gpu_check and the gpu tests ask for ``engine.copier(torch.device("cuda"))`` while the
    engine made it for the parameters' ``cuda:0``: a fresh, empty copier read 0 bytes moved."""
    engine = ChunkFlowEngine(tiny_model(), chunk_size=8, offload="state")
    first = engine.copier(torch.device("cuda:0"))  # making one touches no CUDA API
    first.bytes_to_host = 123
    assert engine.copier(torch.device("cuda")) is first
    assert engine.copier("cuda:0").bytes_to_host == 123
    assert first.device == torch.device("cuda:0") and first.cuda


def test_copies_are_async_only_from_pinned_contiguous_memory(monkeypatch):
    pageable = torch.zeros(4, 4)
    assert not copy_is_async(pageable, "cuda")
    assert not copy_is_async(pageable, "cpu")
    # pinned memory, as is_pinned() reports it on a CUDA machine
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    assert copy_is_async(pageable, "cuda")
    assert not copy_is_async(pageable[:, :2], "cuda")  # strided: staged through pageable memory
    assert not copy_is_async(pageable, "cpu")


def test_the_cuda_copier_refuses_pageable_host_memory():
    """Every host buffer of a copy to or from CUDA must come from ``host_empty`` (pinned): a
    pageable one would make the side-stream copy synchronous. Checked before any CUDA call."""
    copier = Copier(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="pageable host memory is synchronous"):
        copier.to_device(torch.zeros(8), "k", 0)
    with pytest.raises(RuntimeError, match="pageable host memory is synchronous"):
        copier.to_host(torch.zeros(8), torch.zeros(8), "k", 0)


def test_host_buffers_are_pinned_on_cuda_and_not_zero_filled(monkeypatch):
    """``host_empty`` asks for pinned memory on CUDA and never fills it: a zero fill is a host
    memset of the whole offloaded state that no reader needs (see test_offload's NaN test)."""
    calls = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            calls.append((getattr(func, "__name__", str(func)), kwargs.get("pin_memory")))
            if func is torch.empty:  # no pinned memory without CUDA: record, then allocate
                kwargs = {**kwargs, "pin_memory": False}
            return func(*args, **kwargs)

    copier = Copier(torch.device("cuda"))
    with Record():
        copier.host_empty((1000,), torch.float32)
    tensor_ops = [c for c in calls if c[0] != "device"]  # (torch.device(...) is one too)
    assert tensor_ops == [("empty", True)], calls
