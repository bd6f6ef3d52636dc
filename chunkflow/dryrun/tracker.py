"""What a step holds and computes, op by op, on fake tensors: memory by category, FLOPs, bytes.

:class:`StepTracker` is a ``TorchDispatchMode`` entered inside the fake tensor mode, so it sees
every op the real step issues, with the shapes and dtypes the real step would have:

* **Memory as the CUDA caching allocator counts it** (``torch.cuda.memory_allocated``): every
  storage an op creates is live until Python frees it (a weak reference tells), rounded up to
  the allocator's 512-byte granularity (``c10/cuda/CUDACachingAllocator.cpp``, ``round_size``:
  ``kMinBlockSize = 512``); storages resized in place (FSDP2 frees and re-gathers its unsharded
  parameters so) are re-counted. The peak is the largest sum, with the bytes of each category at
  that moment.
* **Categories**: a storage is counted under the phase it was made in (``weights`` while the
  model is built, ``optimizer`` while its state is made, ``transient`` during the step), and
  moves when the step shows what it is: autograd saving it for backward -> ``activations``; the
  chain state tagging it through the engine's meter -> ``kv_state``; becoming a parameter's
  ``.grad`` -> ``gradients``; an input or output of a collective -> ``communication``; a module
  about to use it as a parameter (FSDP2's gathered weights) -> ``weights``.
* **Host memory**: buffers the offload copier makes (:meth:`host_allocator`) are host memory,
  pinned on CUDA, priced as torch's pinned host allocator rounds them
  (:func:`chunkflow.plan.memory.pinned_block_bytes`).
* **FLOPs** per op from ``torch.utils.flop_counter``'s formulas (``FlopCounterMode``'s registry);
  attention FLOPs come from the kernel seam (:class:`CountingKernel`), which knows each chunk's
  segments and prefix: the causal pairs the kernel computes.
* **Bytes moved** per op (inputs read, outputs written; views move nothing), for a roofline.

Values a step reads back to the host (a token count, the loss, a gradient norm) have no data
here: they read as placeholders (``False``, ``1``, ``1.0``). A dry run sees shapes, not numbers.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from chunkflow.plan.memory import pinned_block_bytes
from chunkflow.parallel.fake import is_fake
from chunkflow.runtime.memory import MemoryMeter, _inner

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "kv_state", "communication",
              "transient")
BLOCK_BYTES = 512  # the CUDA caching allocator's rounding (kMinBlockSize)

_aten = torch.ops.aten
_SCALAR = _aten._local_scalar_dense.default
_TO_COPY = _aten._to_copy.default


def allocator_bytes(nbytes: int) -> int:
    """What ``torch.cuda.memory_allocated`` counts for a storage of ``nbytes``."""
    return 0 if nbytes == 0 else -(-nbytes // BLOCK_BYTES) * BLOCK_BYTES


def _is_collective(func) -> bool:
    return func.namespace in ("c10d", "_c10d_functional", "c10d_functional")


def _is_wrapper(t) -> bool:
    """A tensor subclass that holds its data in inner tensors (a DTensor)."""
    return isinstance(t, torch.Tensor) and _inner(t) is not t


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# Ops that read or write only the indexed rows of a large table (an embedding and its gradient):
# their traffic is the rows moved, not the table.
_GATHERS = {"index_select", "embedding", "gather"}
_SCATTERS = {"index_add", "index_add_", "index_put", "index_put_", "scatter_add",
             "scatter_add_", "index_copy_", "index_copy"}


def _moved_bytes(func, inputs, outputs) -> int:
    """Bytes an op reads and writes, for its roofline time."""
    name = func._overloadpacket.__name__
    if name in _GATHERS:  # read the rows, write them, read the index
        return 2 * sum(map(_nbytes, outputs)) + sum(_nbytes(t) for t in inputs
                                                    if not t.dtype.is_floating_point)
    if name in _SCATTERS:  # read the source, read and write the destination rows
        sources = [t for t in inputs[1:] if t.dtype.is_floating_point]
        index = [t for t in inputs[1:] if not t.dtype.is_floating_point]
        return 3 * sum(map(_nbytes, sources)) + sum(map(_nbytes, index))
    return sum(map(_nbytes, inputs)) + sum(map(_nbytes, outputs))


@dataclass
class OpCost:
    """The compute an interval of the step issued: FLOPs and bytes, summed, and each op's
    roofline time (the larger of its FLOPs at peak and its bytes at memory bandwidth)."""

    flops: float = 0.0
    bytes: float = 0.0
    roofline_s: float = 0.0
    ops: int = 0
    by_op: dict = field(default_factory=dict)
    """op name -> roofline seconds"""


class StepTracker(TorchDispatchMode):
    """See the module docstring. ``peak_flops``/``memory_bytes_per_s``: the target GPU's, for
    each op's roofline time."""

    def __init__(self, *, peak_flops: float, memory_bytes_per_s: float):
        super().__init__()
        self.peak_flops, self.memory_bytes_per_s = peak_flops, memory_bytes_per_s
        self._live: dict[int, list] = {}  # storage id -> [allocated bytes, category, weakref]
        self._host: dict[int, list] = {}  # storage id -> [host bytes, weakref]
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.total = self.peak = 0
        self.peak_breakdown = dict(self.by_category)
        self.most = dict(self.by_category)  # the most each category held at any time
        self.step_peak = 0  # the most activations + KV state held at once
        self.host_total = self.host_peak = 0
        self.host_requested = self.host_requested_peak = 0  # before the allocator's rounding
        self.host_calls: list[list[int]] = []  # bytes of each offloaded buffer, per call
        self.category = "transient"
        self.cost = OpCost()
        self.host_copy_bytes = 0
        self.attention_flops = 0.0  # set by CountingKernel for the attention op it calls
        self.in_attention = False
        self._registry = None

    # -- categories ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, category: str):
        """New storages made inside count as ``category`` until the step says otherwise."""
        assert category in CATEGORIES, category
        old, self.category = self.category, category
        try:
            yield
        finally:
            self.category = old

    def tag(self, tensor: torch.Tensor, category: str, *, only_from=("transient",)) -> None:
        """Count ``tensor``'s storage under ``category`` (if it is now one of ``only_from``)."""
        entry = self._live.get(self._key(tensor))
        if entry is None:
            entry = self._register(_inner(tensor).untyped_storage(), category)
        if entry is not None and entry[1] in only_from and entry[1] != category:
            self._count_as(entry[1], -entry[0])
            self._count_as(category, entry[0])
            entry[1] = category

    def tag_module(self, module: torch.nn.Module) -> None:
        for tensor in list(module.parameters()) + list(module.buffers()):
            self.tag(tensor, "weights", only_from=CATEGORIES)

    def tag_grads(self, params) -> None:
        for p in params:
            if p.grad is not None:
                self.tag(p.grad, "gradients", only_from=CATEGORIES)

    def tag_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.tag(value, "optimizer", only_from=CATEGORIES)

    def watch_parameters(self, model: torch.nn.Module) -> None:
        """Tag what each module uses as a parameter (FSDP2's gathered weights appear only when
        its unit runs) as weights, and their ``.grad`` as gradients, when they appear."""
        hooked = WeakIdKeyDictionary()  # tensors compare elementwise: by identity

        def on_grad(param):
            if param.grad is not None:
                self.tag(param.grad, "gradients", only_from=CATEGORIES)

        def watch(params):
            for p in params:
                if p is None:
                    continue
                self.tag(p, "weights", only_from=("transient", "communication"))
                if p.requires_grad and p not in hooked:
                    p.register_post_accumulate_grad_hook(on_grad)
                    hooked[p] = True

        for module in model.modules():
            module.register_forward_pre_hook(lambda m, args: watch(m._parameters.values()))
        # weights read without calling their module (the head's, by the loss): at each action
        self.sweep = lambda: watch(model.parameters())
        self.sweep()

    def start_step(self) -> None:
        """Measure from here: the peak and the maxima start at what is live now (the weights,
        the optimizer state), the cost at zero."""
        self.peak, self.peak_breakdown = self.total, dict(self.by_category)
        self.most, self.step_peak = dict(self.by_category), 0
        self.cost = OpCost()

    def meter(self) -> "TaggingMeter":
        return TaggingMeter(self)

    def host_allocator(self, host_empty):
        """Wrap an offload copier's ``host_empty``: what it makes is pinned host memory."""
        def allocate(shape, dtype):
            tensor = host_empty(shape, dtype)
            storage = tensor.untyped_storage()
            key = storage._cdata
            entry = self._live.pop(key, None)
            if entry is not None:
                self._add(entry[1], -entry[0])
            nbytes = pinned_block_bytes(storage.nbytes())
            self._host[key] = [nbytes, weakref.ref(storage, lambda _, k=key: self._free_host(k)),
                               storage.nbytes()]
            self.host_total += nbytes
            self.host_peak = max(self.host_peak, self.host_total)
            self.host_requested += storage.nbytes()
            self.host_requested_peak = max(self.host_requested_peak, self.host_requested)
            return tensor
        return allocate

    # -- bookkeeping ---------------------------------------------------------------------------

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return _inner(tensor).untyped_storage()._cdata

    def _count_as(self, category: str, nbytes: int) -> None:
        """``nbytes`` more (or fewer) under ``category``; the total unchanged."""
        self.by_category[category] += nbytes
        self.most[category] = max(self.most[category], self.by_category[category])
        if category in ("activations", "kv_state"):
            self.step_peak = max(self.step_peak, self.by_category["activations"]
                                 + self.by_category["kv_state"])

    def _add(self, category: str, nbytes: int) -> None:
        self._count_as(category, nbytes)
        self.total += nbytes
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = dict(self.by_category)

    def _register(self, storage, category: str):
        key = storage._cdata
        if key in self._live or key in self._host:
            return self._live.get(key)
        nbytes = allocator_bytes(storage.nbytes())
        entry = [nbytes, category, weakref.ref(storage, lambda _, k=key: self._free(k))]
        self._live[key] = entry
        self._add(category, nbytes)
        return entry

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._add(entry[1], -entry[0])

    def _free_host(self, key: int) -> None:
        entry = self._host.pop(key, None)
        if entry is not None:
            self.host_total -= entry[0]
            self.host_requested -= entry[2]

    def resized(self, storage) -> None:
        """A storage changed size in place (``UntypedStorage.resize_``)."""
        entry = self._live.get(storage._cdata)
        if entry is None:
            self._register(storage, self.category)
            return
        nbytes = allocator_bytes(storage.nbytes())
        self._add(entry[1], nbytes - entry[0])
        entry[0] = nbytes

    @contextlib.contextmanager
    def resizes(self):
        """Count in-place storage resizes while inside (FSDP2 frees and re-gathers so)."""
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            tracker.resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original

    # -- the dispatch hook ---------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SCALAR and is_fake(args[0]):  # no data to read: a placeholder
            dtype = args[0].dtype
            return False if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        flat_args = tree_flatten((args, kwargs))[0]
        if any(_is_wrapper(t) for t in flat_args):
            # a DTensor (or another wrapper subclass): let it run its local ops, which come back
            # here, so that bytes and FLOPs are this rank's
            return NotImplemented
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        collective = _is_collective(func)
        category = "communication" if collective else self.category
        if func is _TO_COPY and category == "transient":
            # a cast copy of a gradient (FSDP2's float32 accumulator) counts as one, and so does
            # a 16-bit copy of a weight (autocast's cached bf16 weights, FSDP2's all-gather
            # input); a wider copy of a weight is a computation's transient
            source = self._live.get(self._key(args[0]))
            if source is not None and (source[1] == "gradients" or (
                    source[1] == "weights" and outputs and outputs[0].element_size() == 2)):
                category = source[1]
        for t in outputs:
            self._register(t.untyped_storage(), category)
        inputs = [t for t in flat_args if isinstance(t, torch.Tensor)]
        if collective:
            for t in inputs:
                self.tag(t, "communication")
        elif not func.is_view:
            self._count(func, inputs, outputs, args, kwargs, out)
        return out

    def _count(self, func, inputs, outputs, args, kwargs, out) -> None:
        if self._registry is None:
            from torch.utils.flop_counter import flop_registry

            self._registry = flop_registry
        flops = 0
        formula = self._registry.get(func._overloadpacket)
        if self.in_attention:
            # the kernel seam counts the causal pairs; the ops inside it (one varlen kernel, or
            # a math kernel's tiles) add their bytes, and the varlen kernel takes the FLOPs
            if func.namespace == "torch_attn":
                flops, self.attention_flops = self.attention_flops, 0.0
        elif formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
        if not outputs:  # a query (a tensor's device, sizes): no data moves
            return
        nbytes = _moved_bytes(func, inputs, outputs)
        if self._host and any(self._key(t) in self._host for t in inputs + outputs):
            self.host_copy_bytes += nbytes  # a host <-> device copy: the side stream's time
            return
        self.add_cost(func._overloadpacket.__name__, flops, nbytes)

    def add_cost(self, name: str, flops: float, nbytes: float) -> None:
        cost = self.cost
        cost.flops += flops
        cost.bytes += nbytes
        cost.ops += 1
        seconds = max(flops / self.peak_flops, nbytes / self.memory_bytes_per_s)
        cost.roofline_s += seconds
        cost.by_op[name] = cost.by_op.get(name, 0.0) + seconds


class TaggingMeter(MemoryMeter):
    """The engine's memory meter (:class:`chunkflow.runtime.memory.MemoryMeter`: saved tensors
    and chain state, what the trainer reports on CPU) telling the tracker instead which storages
    are activations (saved for backward) and which are KV state."""

    def __init__(self, tracker: StepTracker):
        super().__init__()
        self.tracker = tracker

    def reset(self, exclude=()) -> None:
        self.generation += 1  # fake storages have no addresses to key on: the tracker counts

    def tag(self, tensor: torch.Tensor, category: str) -> None:
        self.tracker.tag(tensor, category)

    def _pack(self, tensor: torch.Tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            self.tracker.tag(tensor, "activations")
        return tensor

    @staticmethod
    def _unpack(packed):
        return packed


class CountingKernel:
    """A chunk attention kernel that adds the FLOPs the causal kernel computes for each call
    (``4 * pairs * H * D`` forward: QK^T and PV; 2.5x that backward, FlashAttention's five
    matmuls against two) to the tracker, where ``pairs`` are the (query, key) pairs its causal
    masks keep: what ``FlopCounterMode`` cannot see, since a varlen call's sequence boundaries
    are data."""

    def __init__(self, inner, tracker: StepTracker):
        self.inner, self.tracker = inner, tracker

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _flops(self, q: torch.Tensor, view) -> float:
        from chunkflow.plan.cost import attention_pairs

        heads, dim = q.shape[-3], q.shape[-1]  # (1, H, L, D)
        return 4.0 * attention_pairs([n for _, n in view.segments], view.prefix_len) * heads * dim

    def forward(self, q, k, v, view):
        with self._counting(self._flops(q, view)):
            return self.inner.forward(q, k, v, view)

    def backward(self, dout, q, k, v, out, lse, view):
        with self._counting(2.5 * self._flops(q, view)):
            return self.inner.backward(dout, q, k, v, out, lse, view)

    @contextlib.contextmanager
    def _counting(self, flops: float):
        tracker = self.tracker
        tracker.attention_flops, tracker.in_attention = flops, True
        try:
            yield
        finally:
            if tracker.attention_flops:  # no single attention op took them: count them apart
                tracker.add_cost("attention", tracker.attention_flops, 0)
            tracker.attention_flops, tracker.in_attention = 0.0, False
