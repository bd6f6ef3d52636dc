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
    the compute stream wait for it); elsewhere plain synchronous copies. Counts what it moved
    (``bytes_to_device``, ``bytes_to_host``, ``log``: (direction, what, layer, nbytes)) since
    the last :meth:`reset`, which the engine calls at the start of every step."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.reset()

    def reset(self) -> None:
        self.bytes_to_device = self.bytes_to_host = 0
        self.log: list[tuple[str, str, int, int]] = []

    def host_empty(self, shape, dtype) -> torch.Tensor:
        """A host buffer (pinned on CUDA, so copies to and from it can be asynchronous)."""
        return torch.zeros(shape, dtype=dtype, pin_memory=self.cuda)

    def to_device(self, host: torch.Tensor, what: str, layer: int):
        """Start copying ``host`` to the device; returns (tensor, ready event or None)."""
        self.bytes_to_device += host.nbytes
        self.log.append(("to_device", what, layer, host.nbytes))
        if not self.cuda:
            return host.clone(), None
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
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
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(device_tensor, non_blocking=True)
        device_tensor.record_stream(self.stream)

    def synchronize(self) -> None:
        if self.cuda:
            self.stream.synchronize()


class OffloadedChainState:
    """A :class:`ChainState` whose buffers live in host memory (``--chunking.offload``).

    The same interface and layouts. Per layer, the keys/values (and, in backward, the gradient
    buffers) are brought to the device when a kernel first touches that layer, and the next
    layer in the direction of travel (ascending in forward, descending in backward) is
    prefetched behind it; at most ``resident`` layers stay on the device, the least recently
    used one going back to the host (its new rows of keys/values and its gradients, if
    touched). So the device holds ``resident`` layers' state instead of every layer's.
    The meter counts the device-resident bytes only; ``host_bytes`` is what lives on the host.
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
        self._host: dict[int, dict[str, torch.Tensor]] = {}  # layer -> k, v, gk, gv
        self._grads_on_host: set[int] = set()  # layers whose host gradients are not all zero
        self._kv_on_host: set[int] = set()  # layers whose host keys/values are not all zero
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
        self._like = (like.shape[1], like.shape[3], like.dtype)
        grad_dtype = torch.promote_types(like.dtype, torch.float32)
        for layer in self.layer_ids:
            bufs = {"k": self.copier.host_empty(self._shape(self.capacity), like.dtype),
                    "v": self.copier.host_empty(self._shape(self.capacity), like.dtype)}
            if self.with_grads:
                bufs["gk"] = self.copier.host_empty(self._shape(self.seq_len), grad_dtype)
                bufs["gv"] = self.copier.host_empty(self._shape(self.seq_len), grad_dtype)
            self._host[layer] = bufs
            self.host_bytes += sum(t.nbytes for t in bufs.values())

    # -- residency ----------------------------------------------------------------------------

    def _fetch(self, layer: int) -> dict:
        """Start bringing ``layer``'s keys/values to the device (no wait)."""
        entry = self._dev.get(layer)
        if entry is None:
            host = self._host[layer]
            if layer in self._kv_on_host:
                k, ek = self.copier.to_device(host["k"], "k", layer)
                v, ev = self.copier.to_device(host["v"], "v", layer)
            else:  # nothing written back yet: no need to move zeros
                k = torch.zeros_like(host["k"], device=self.copier.device)
                v, ek, ev = torch.zeros_like(k), None, None
            entry = {"k": k, "v": v, "events": [(k, ek), (v, ev)], "dirty": None,
                     "gk": None, "gv": None}
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
            if layer in self._grads_on_host:
                host = self._host[layer]
                gk, e1 = self.copier.to_device(host["gk"], "grad_k", layer)
                gv, e2 = self.copier.to_device(host["gv"], "grad_v", layer)
                entry["events"] += [(gk, e1), (gv, e2)]
            else:  # nothing accumulated yet: no need to move zeros
                dtype = torch.promote_types(self._like[2], torch.float32)
                gk = torch.zeros(self._shape(self.seq_len), dtype=dtype,
                                 device=self.copier.device)
                gv = torch.zeros_like(gk)
            entry["gk"], entry["gv"] = gk, gv
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
        if entry["dirty"] is not None:
            a, b = entry["dirty"]
            for name in ("k", "v"):
                self.copier.to_host(self._rows(host[name], a, b), self._rows(entry[name], a, b),
                                    name, layer)
            self._kv_on_host.add(layer)
        nbytes = entry["k"].nbytes + entry["v"].nbytes
        if entry["gk"] is not None:
            self.copier.to_host(host["gk"], entry["gk"], "grad_k", layer)
            self.copier.to_host(host["gv"], entry["gv"], "grad_v", layer)
            self._grads_on_host.add(layer)
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
        a, b = entry["dirty"] or (start, end)
        entry["dirty"] = (min(a, start), max(b, end))

    def keys(self, layer_idx: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._use(layer_idx)
        return self._rows(entry["k"], start, end), self._rows(entry["v"], start, end)

    def add_grad(self, layer_idx: int, start: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        entry = self._use(layer_idx, grads=True)
        _add_rows(self.layout, entry["gk"], entry["gv"], start, dk, dv)

    def own_grads(self, layer_idx: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._use(layer_idx, grads=True)
        return (_as_bhsd(self.layout, self._rows(entry["gk"], start, start + n)),
                _as_bhsd(self.layout, self._rows(entry["gv"], start, start + n)))

    def free(self) -> None:
        self.copier.synchronize()  # no copy may still be writing into a freed host buffer
        self._count(-self._nbytes)
        self._dev, self._host, self._grads_on_host, self._kv_on_host = {}, {}, set(), set()
        self.host_bytes = 0
