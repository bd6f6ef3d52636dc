"""Key/value state of one chain: what later chunks attend to, and the gradients they send back.

Per layer (the layers of this model or pipeline stage, by global index): the post-RoPE keys and
values of the chain's sequence with the un-expanded key/value heads (G, not H), filled chunk by
chunk as forward runs, and their gradients in float32 buffers (or the key dtype where that is
wider), accumulated as later chunks run backward.

Two layouts, chosen by the attention kernel that reads them:

* ``"bhsd"``: (1, G, T, D), the layout of the CPU kernels' calls (a prefix block is a view);
* ``"thd"``: (T, G, D), token-major like varlen kernels' inputs, so a chain segment's keys,
  prefix and own, are one contiguous view ``keys(layer, end)``. Its buffers have ``capacity``
  rows, room past the prefix for the chain's last chunk (whose own keys, packed tail segments
  included, are written there before attention).

Gradient buffers cover the ``seq_len`` prefix positions only: nothing reads the gradient of keys
past them. All buffers are allocated at the first write, in the dtype of the keys actually
produced (bf16 under autocast, whatever the weights), every layer at once. The engine frees the
state once the chain's first chunk has run backward.
"""

from __future__ import annotations

from typing import Sequence

import torch

from chunkflow.plan.memory import HOST_ALIGN, host_pieces, pinned_block_bytes
from chunkflow.runtime.devices import copy_is_async, normalize_device
from chunkflow.runtime.memory import MemoryMeter

LAYOUTS = ("bhsd", "thd")


def _rows(layout: str, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Positions [start, end) of a state buffer in ``layout`` (a view)."""
    return x[start:end] if layout == "thd" else x[:, :, start:end]


def _as_bhsd(layout: str, x: torch.Tensor) -> torch.Tensor:
    """A state buffer's rows as (1, G, n, D) (a view)."""
    return x.transpose(0, 1)[None] if layout == "thd" else x


def _num_rows(layout: str, x: torch.Tensor) -> int:
    return x.shape[0] if layout == "thd" else x.shape[2]


class ChainState:
    def __init__(self, *, layer_ids: Sequence[int], seq_len: int, meter: MemoryMeter,
                 with_grads: bool = True, layout: str = "bhsd", capacity: int | None = None):
        """``seq_len``: prefix positions later chunks read (the start of the chain's last
        chunk). ``with_grads=False``: keys and values only (a forward-only pass, e.g.
        evaluation). ``capacity``: rows of the key/value buffers (at least ``seq_len``)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}")
        self.seq_len, self.with_grads, self.layout = seq_len, with_grads, layout
        self.capacity = seq_len if capacity is None else max(capacity, seq_len)
        self.k: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self.v: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self.grad_k: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self.grad_v: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self._meter = meter
        self._nbytes = 0

    def as_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A (1, G, n, D) tensor in this state's layout (a view)."""
        return _as_layout(self.layout, x)

    def write(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk's keys/values (1, G, n, D) at sequence positions [start, start + n).

        Positions past the buffers' capacity are not kept: nothing reads them."""
        end = min(start + k.shape[2], self.capacity)
        if start >= end:
            return
        if self.k[layer_idx] is None:
            self._allocate(k)
        _write_rows(self.layout, self.k[layer_idx], self.v[layer_idx], start, end, k, v)

    def keys(self, layer_idx: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end): views in this layout, no copy."""
        return (_rows(self.layout, self.k[layer_idx], start, end),
                _rows(self.layout, self.v[layer_idx], start, end))

    def add_grad(self, layer_idx: int, start: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Add gradients of positions [start, start + n) (given in this layout)."""
        _add_rows(self.layout, self.grad_k[layer_idx], self.grad_v[layer_idx], start, dk, dv)

    def own_grads(self, layer_idx: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What later chunks sent back for positions [start, start + n), as (1, G, n, D)."""
        return (_as_bhsd(self.layout, _rows(self.layout, self.grad_k[layer_idx], start, start + n)),
                _as_bhsd(self.layout, _rows(self.layout, self.grad_v[layer_idx], start, start + n)))

    def grads(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient buffers (grad_k, grad_v) of one layer."""
        return self.grad_k[layer_idx], self.grad_v[layer_idx]

    def _allocate(self, like: torch.Tensor) -> None:
        g, d = like.shape[1], like.shape[3]
        grad_dtype = torch.promote_types(like.dtype, torch.float32)

        def shape(rows: int):
            return (rows, g, d) if self.layout == "thd" else (1, g, rows, d)

        parts = [(self.k, like.dtype, self.capacity), (self.v, like.dtype, self.capacity)]
        if self.with_grads:
            parts += [(self.grad_k, grad_dtype, self.seq_len),
                      (self.grad_v, grad_dtype, self.seq_len)]
        for buffers, dtype, rows in parts:
            for layer_idx in buffers:
                buffers[layer_idx] = torch.zeros(shape(rows), dtype=dtype, device=like.device)
                self._meter.tag(buffers[layer_idx], "kv_state")
                self._nbytes += buffers[layer_idx].nbytes
        self._meter.add(self._nbytes)

    def free(self) -> None:
        self.k, self.v, self.grad_k, self.grad_v = {}, {}, {}, {}
        self._meter.add(-self._nbytes)
        self._nbytes = 0


def _write_rows(layout, kbuf, vbuf, start: int, end: int, k, v) -> None:
    """Store (1, G, >= end - start, D) keys/values at positions [start, end)."""
    n = end - start
    _rows(layout, kbuf, start, end).copy_(_as_layout(layout, k)[:n] if layout == "thd"
                                          else k[:, :, :n])
    _rows(layout, vbuf, start, end).copy_(_as_layout(layout, v)[:n] if layout == "thd"
                                          else v[:, :, :n])


def _as_layout(layout: str, x: torch.Tensor) -> torch.Tensor:
    """A (1, G, n, D) tensor in ``layout`` (a view)."""
    return x[0].transpose(0, 1) if layout == "thd" else x


def _add_rows(layout, gk, gv, start: int, dk, dv) -> None:
    """Add gradients (in ``layout``) of positions [start, start + n)."""
    end = start + _num_rows(layout, dk)
    _rows(layout, gk, start, end).add_(dk.to(gk.dtype))
    _rows(layout, gv, start, end).add_(dv.to(gv.dtype))


class Copier:
    """Copies between the compute device and host memory. On CUDA: on a side stream, so a
    copy overlaps the compute it does not feed (``to_device`` returns at once; ``wait`` makes
    the compute stream wait for it), from and to pinned host memory (``host_empty``; a copy
    from pageable memory would be synchronous); elsewhere plain synchronous copies. Counts what
    it moved (``bytes_to_device``, ``bytes_to_host``, ``log``: (direction, what, layer,
    nbytes)) since the last :meth:`reset`, which the engine calls at the start of every step.

    ``device`` is normalised (``cuda`` is ``cuda:<current>``), and making a Copier touches no
    CUDA API (its stream is made at the first copy)."""

    def __init__(self, device: torch.device):
        self.device = normalize_device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = None
        self.reset()

    @property
    def stream(self):
        """The side stream the copies run on (CUDA), made when first needed."""
        if self._stream is None and self.cuda:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def reset(self) -> None:
        self.bytes_to_device = self.bytes_to_host = 0
        self.log: list[tuple[str, str, int, int]] = []

    def host_empty(self, shape, dtype) -> torch.Tensor:
        """An uninitialised host buffer (pinned on CUDA, so copies to and from it can be
        asynchronous). Not zero-filled: that would be a host memset of every byte, and every
        reader reads only what was copied in."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    def to_device(self, host: torch.Tensor, what: str, layer: int, *, into=None):
        """Start copying ``host`` to the device; returns (tensor, ready event or None).

        ``into``: ``(make, place)``: the copy goes into ``place(make())`` (a view of a new
        device tensor ``make()`` returns, made on the copy stream), and that tensor is
        returned: a buffer of which only some rows are copied."""
        self.bytes_to_device += host.nbytes
        self.log.append(("to_device", what, layer, host.nbytes))
        if not self.cuda:
            if into is None:
                return host.clone(), None
            out = into[0]()
            into[1](out).copy_(host)
            return out, None
        _check_pinned(host, what, layer)
        non_blocking = copy_is_async(host, self.device)  # not for a strided view: see there
        with torch.cuda.stream(self.stream):
            if into is None:
                out = host.to(self.device, non_blocking=non_blocking)
            else:
                out = into[0]()
                into[1](out).copy_(host, non_blocking=non_blocking)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def wait(self, tensor: torch.Tensor, event) -> None:
        """Before the compute stream reads ``tensor`` (from :meth:`to_device`)."""
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            tensor.record_stream(current)  # allocated on the side stream, used on this one

    def to_host(self, host: torch.Tensor, device_tensor: torch.Tensor, what: str,
                layer: int) -> None:
        """Copy ``device_tensor`` into ``host`` once the compute stream has produced it."""
        self.bytes_to_host += device_tensor.nbytes
        self.log.append(("to_host", what, layer, device_tensor.nbytes))
        if not self.cuda:
            host.copy_(device_tensor)
            return
        _check_pinned(host, what, layer)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(device_tensor, non_blocking=copy_is_async(host, self.device))
        device_tensor.record_stream(self.stream)

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()


def host_buffers(copier: Copier, specs) -> tuple[dict, list[torch.Tensor], int]:
    """Uninitialised host buffers ``(key, shape, dtype)``, in order, as views of a few
    allocations (:func:`~chunkflow.plan.memory.host_pieces`: pinned on CUDA, where torch's
    caching host allocator rounds each up to a power of two; the planner prices the same
    pieces). Returns (views by key, the allocations, the bytes the host allocator holds)."""
    sizes = [dtype.itemsize * _numel(shape) for _, shape, dtype in specs]
    views, pieces, held, first = {}, [], 0, 0
    for count, nbytes in host_pieces(sizes):
        piece = copier.host_empty((nbytes,), torch.uint8)
        pieces.append(piece)
        held += pinned_block_bytes(nbytes) if copier.cuda else nbytes
        offset = 0
        for (key, shape, dtype), size in zip(specs[first:first + count],
                                             sizes[first:first + count]):
            views[key] = piece[offset:offset + size].view(dtype).view(shape)
            offset += -(-size // HOST_ALIGN) * HOST_ALIGN
        first += count
    return views, pieces, held


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_pinned(host: torch.Tensor, what: str, layer: int) -> None:
    """A CUDA copy to or from pageable host memory would be synchronous: the Copier's host
    buffers come from :meth:`Copier.host_empty`, and anything else is a bug."""
    if not host.is_pinned():
        raise RuntimeError(f"{what} of layer {layer}: a copy between CUDA and pageable host "
                           f"memory is synchronous; allocate the host side with host_empty")


class OffloadedChainState:
    """A :class:`ChainState` whose buffers live in host memory (``--chunking.offload``).

    The same interface and layouts. Per layer, the keys/values (and, in backward, the gradient
    buffers) are brought to the device when a kernel first touches that layer, and the next
    layer in the direction of travel (ascending in forward, descending in backward) is
    prefetched behind it; at most ``resident`` layers stay on the device, the least recently
    used one going back to the host (its new rows of keys/values and its gradients, if
    touched). So the device holds ``resident`` layers' state instead of every layer's.

    Only rows in use move. Back to the host: the rows written (keys/values) or added to
    (gradients) while on the device; to the device: the rows the host holds. Neither counts
    rows at or past the start of the lowest chunk whose backward has read its gradients
    (``own_grads``): a chain's backward runs its chunks in descending order, and nothing reads
    those rows again. So device rows outside these are uninitialised (keys/values: nothing
    reads a row before it is written) or zero (gradients, which accumulate).

    The host buffers are views of a few pinned pieces (:func:`chunkflow.plan.memory.host_pieces`:
    torch's caching host allocator rounds each allocation up to a power of two, and the pieces
    keep that waste below a buffer each), uninitialised (a zero fill would be a host memset of
    the whole state that no reader needs). The meter counts the device-resident bytes only;
    ``host_bytes`` is what the host allocator holds for the state, the figure
    :func:`chunkflow.plan.memory.offloaded_state_host_bytes` prices.
    """

    def __init__(self, *, layer_ids: Sequence[int], seq_len: int, meter: MemoryMeter,
                 copier: Copier, with_grads: bool = True, layout: str = "bhsd",
                 capacity: int | None = None, resident: int = 2):
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}")
        if resident < 2:
            raise ValueError(f"resident={resident}: at least 2 layers (the one in use and the "
                             f"one being prefetched)")
        self.seq_len, self.with_grads, self.layout = seq_len, with_grads, layout
        self.capacity = seq_len if capacity is None else max(capacity, seq_len)
        self.layer_ids = sorted(layer_ids)
        self.copier, self.resident = copier, resident
        self._meter = meter
        self._host: dict[int, dict[str, torch.Tensor]] = {}  # layer -> k, v, gk, gv (views)
        self._pieces: list[torch.Tensor] = []  # the host allocations those views share
        self._kv_rows: dict[int, tuple[int, int]] = {}  # host key/value rows written
        self._grad_rows: dict[int, tuple[int, int]] = {}  # host gradient rows added to
        self._live: dict[int, int] = {}  # rows from here on are read no more
        self._dev: dict[int, dict] = {}  # resident layers, least recently used first
        self._like: tuple | None = None  # (G, D, dtype) of the keys
        self._last: int | None = None
        self._direction = 1
        self.host_bytes = 0
        self._nbytes = 0  # on the device

    as_layout = ChainState.as_layout

    def _shape(self, rows: int):
        g, d, _ = self._like
        return (rows, g, d) if self.layout == "thd" else (1, g, rows, d)

    def _rows(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return _rows(self.layout, x, a, b)

    def _allocate_host(self, like: torch.Tensor) -> None:
        """Every layer's host buffers, in the order and pieces the planner prices."""
        self._like = (like.shape[1], like.shape[3], like.dtype)
        grad_dtype = torch.promote_types(like.dtype, torch.float32)
        specs = []  # ((layer, name), shape, dtype)
        for layer in self.layer_ids:
            specs += [((layer, "k"), self._shape(self.capacity), like.dtype),
                      ((layer, "v"), self._shape(self.capacity), like.dtype)]
            if self.with_grads:
                specs += [((layer, "gk"), self._shape(self.seq_len), grad_dtype),
                          ((layer, "gv"), self._shape(self.seq_len), grad_dtype)]
        views, self._pieces, self.host_bytes = host_buffers(self.copier, specs)
        for (layer, name), view in views.items():
            self._host.setdefault(layer, {})[name] = view

    # -- residency ----------------------------------------------------------------------------

    def _in_use(self, rows: dict, layer: int) -> tuple[int, int]:
        """The rows of ``rows[layer]`` still read (empty: a == b)."""
        a, b = rows.get(layer, (0, 0))
        b = min(b, self._live.get(layer, b))
        return (a, b) if a < b else (0, 0)

    def _to_device(self, host: torch.Tensor, what: str, layer: int, rows: tuple[int, int], *,
                   zero: bool):
        """A device copy of ``host`` of which ``rows`` come from the host, the rest empty
        (``zero``: zeros); returns (tensor, ready event or None)."""
        device = self.copier.device

        def make():
            fill = torch.zeros if zero else torch.empty
            return fill(host.shape, dtype=host.dtype, device=device)

        a, b = rows
        if a == b:
            out, event = make(), None
        else:
            out, event = self.copier.to_device(self._rows(host, a, b), what, layer,
                                               into=(make, lambda t: self._rows(t, a, b)))
        self._meter.tag(out, "kv_state")
        return out, event

    def _fetch(self, layer: int) -> dict:
        """Start bringing ``layer``'s keys/values to the device (no wait)."""
        entry = self._dev.get(layer)
        if entry is None:
            host, rows = self._host[layer], self._in_use(self._kv_rows, layer)
            k, ek = self._to_device(host["k"], "k", layer, rows, zero=False)
            v, ev = self._to_device(host["v"], "v", layer, rows, zero=False)
            entry = {"k": k, "v": v, "events": [(k, ek), (v, ev)], "dirty": None,
                     "gk": None, "gv": None, "grad_rows": None, "grad_dirty": False}
            self._dev[layer] = entry
            self._count(k.nbytes + v.nbytes)
        return entry

    def _use(self, layer: int, *, grads: bool = False) -> dict:
        """``layer`` on the device, ready to read (and its gradient buffers with ``grads``);
        prefetch the next layer, and send the least recently used ones back."""
        if self._like is None:
            raise RuntimeError("the chain state is read before anything was written to it")
        if layer not in self._dev:
            self._make_room(keep=set())
        entry = self._fetch(layer)
        self._dev[layer] = self._dev.pop(layer)  # most recently used
        if grads and entry["gk"] is None:
            host, rows = self._host[layer], self._in_use(self._grad_rows, layer)
            gk, e1 = self._to_device(host["gk"], "grad_k", layer, rows, zero=True)
            gv, e2 = self._to_device(host["gv"], "grad_v", layer, rows, zero=True)
            entry["events"] += [(gk, e1), (gv, e2)]
            entry["gk"], entry["gv"] = gk, gv
            entry["grad_rows"] = rows if rows[0] < rows[1] else None
            self._count(gk.nbytes + gv.nbytes)
        for tensor, event in entry["events"]:
            self.copier.wait(tensor, event)
        entry["events"] = []
        if self._last is not None and self._last != layer:
            self._direction = 1 if layer > self._last else -1
        self._last = layer
        nxt = self._neighbour(layer)
        if nxt is not None and nxt not in self._dev:
            self._make_room(keep={layer})
            self._fetch(nxt)
        return entry

    def _neighbour(self, layer: int) -> int | None:
        """The layer a kernel will most likely touch next: one further in the direction of
        travel (ascending in a forward, descending in a backward)."""
        j = self.layer_ids.index(layer) + self._direction
        return self.layer_ids[j] if 0 <= j < len(self.layer_ids) else None

    def _make_room(self, keep: set) -> None:
        """Send least recently used layers back until one more fits."""
        for layer in list(self._dev):
            if len(self._dev) < self.resident:
                break
            if layer not in keep:
                self._write_back(layer)

    def _write_back(self, layer: int) -> None:
        entry, host = self._dev.pop(layer), self._host[layer]
        for tensor, event in entry["events"]:  # a prefetch never used: let it land first
            self.copier.wait(tensor, event)
        live = self._live.get(layer, self.capacity)
        if entry["dirty"] is not None:
            a, b = entry["dirty"][0], min(entry["dirty"][1], live)
            if a < b:
                for name in ("k", "v"):
                    self.copier.to_host(self._rows(host[name], a, b),
                                        self._rows(entry[name], a, b), name, layer)
                old = self._kv_rows.get(layer)
                # rows are written chunk after chunk: what is on the host stays one range
                assert old is None or (a <= old[1] and b >= old[0]), (old, (a, b))
                self._kv_rows[layer] = (a, b) if old is None else (min(a, old[0]),
                                                                   max(b, old[1]))
        nbytes = entry["k"].nbytes + entry["v"].nbytes
        if entry["gk"] is not None:
            if entry["grad_dirty"]:  # the device holds every host row plus what was added
                a, b = entry["grad_rows"]
                b = min(b, live)
                if a < b:
                    self.copier.to_host(self._rows(host["gk"], a, b),
                                        self._rows(entry["gk"], a, b), "grad_k", layer)
                    self.copier.to_host(self._rows(host["gv"], a, b),
                                        self._rows(entry["gv"], a, b), "grad_v", layer)
                self._grad_rows[layer] = (a, b) if a < b else (0, 0)
            nbytes += entry["gk"].nbytes + entry["gv"].nbytes
        self._count(-nbytes)

    def _count(self, nbytes: int) -> None:
        self._nbytes += nbytes
        self._meter.add(nbytes)

    @property
    def device_bytes(self) -> int:
        return self._nbytes

    # -- the ChainState interface ---------------------------------------------------------------

    def write(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = min(start + k.shape[2], self.capacity)
        if start >= end:
            return
        if self._like is None:
            self._allocate_host(k)
        entry = self._use(layer_idx)
        _write_rows(self.layout, entry["k"], entry["v"], start, end, k, v)
        entry["dirty"] = _hull(entry["dirty"], (start, end))

    def keys(self, layer_idx: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._use(layer_idx)
        return self._rows(entry["k"], start, end), self._rows(entry["v"], start, end)

    def add_grad(self, layer_idx: int, start: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        entry = self._use(layer_idx, grads=True)
        _add_rows(self.layout, entry["gk"], entry["gv"], start, dk, dv)
        entry["grad_rows"] = _hull(entry["grad_rows"], (start, start + _num_rows(self.layout, dk)))
        entry["grad_dirty"] = True

    def own_grads(self, layer_idx: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What later chunks sent back for positions [start, start + n). This is the chunk's
        last read of the layer in its backward: from here on rows from ``start`` are dead."""
        entry = self._use(layer_idx, grads=True)
        self._live[layer_idx] = min(self._live.get(layer_idx, self.capacity), start)
        return (_as_bhsd(self.layout, self._rows(entry["gk"], start, start + n)),
                _as_bhsd(self.layout, self._rows(entry["gv"], start, start + n)))

    def free(self) -> None:
        self.copier.synchronize()  # no copy may still be writing into a freed host buffer
        self._count(-self._nbytes)
        self._dev, self._host, self._pieces = {}, {}, []
        self._kv_rows, self._grad_rows, self._live = {}, {}, {}
        self.host_bytes = 0


def _hull(a: tuple[int, int] | None, b: tuple[int, int]) -> tuple[int, int]:
    """The smallest row range holding both ranges."""
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))
