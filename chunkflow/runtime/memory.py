"""Peak-memory accounting for one training step.

On CUDA the engine reports ``torch.cuda.max_memory_allocated``. On CPU there is no allocator
statistic, so :class:`MemoryMeter` counts what the step holds on purpose: every tensor autograd
saves for backward (via ``saved_tensors_hooks``; deduplicated by storage; parameters excluded),
plus the chains' key/value state and its gradients. The peak of that sum is the step's high-water
mark. Transient buffers inside one operator are not counted.
"""

from __future__ import annotations

import torch


class _Held:
    """A saved tensor, counted while autograd keeps it."""

    __slots__ = ("tensor", "meter", "key", "generation")

    def __init__(self, tensor: torch.Tensor, meter: "MemoryMeter", key: int):
        self.tensor, self.meter, self.key = tensor, meter, key
        self.generation = meter.generation

    def __del__(self):
        if self.generation == self.meter.generation:  # not a leftover of an earlier step
            self.meter._release(self.key)


def _inner(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor that holds a wrapper subclass's data: a tensor-parallel DTensor is
    counted by its local shard, what this rank holds; a collective's pending result
    (functional collectives' AsyncCollectiveTensor) by the buffer it will fill."""
    while type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        tensor = getattr(tensor, names[0])
    return tensor


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter or a view of one (linear layers save ``weight.t()``): weights, not step
    memory. This catches what ``reset``'s list cannot: FSDP2's gathered parameters, which exist
    only from the step's first forward."""
    base = tensor._base if tensor._base is not None else tensor
    # (a parameter is a leaf; the leaf test is cheap, Parameter's isinstance runs Python)
    return base.is_leaf and isinstance(base, torch.nn.Parameter)


class MemoryMeter:
    def __init__(self):
        self.current = 0
        self.peak = 0
        self.generation = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [refcount, nbytes]
        self._excluded: set[int] = set()

    def reset(self, exclude: list[torch.Tensor] = ()) -> None:
        """Start a new step from zero; tensors in ``exclude`` (parameters) are never counted.

        Anything an earlier step still holds (say, after it raised) is forgotten, not carried over.
        """
        # FSDP's sharded parameters are DTensors: their storage is the local shard's.
        self._excluded = {(t.to_local() if hasattr(t, "to_local") else t)
                          .untyped_storage().data_ptr() for t in exclude}
        self.generation += 1
        self._storages = {}
        self.current = self.peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def tag(self, tensor: torch.Tensor, category: str) -> None:
        """Say what ``tensor`` is (``"kv_state"``): nothing here; a dry run's meter
        (:class:`chunkflow.dryrun.tracker.TaggingMeter`) counts its storage under that name."""

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        storage = (tensor if type(tensor) is torch.Tensor else _inner(tensor)).untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._excluded or _is_parameter(tensor):
            return tensor
        entry = self._storages.get(key)
        if entry is None:
            self._storages[key] = [1, nbytes]
            self.add(nbytes)
        else:
            entry[0] += 1
        return _Held(tensor, self, key)

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.add(-entry[1])
