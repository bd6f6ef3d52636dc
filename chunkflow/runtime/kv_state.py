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
        return x[0].transpose(0, 1) if self.layout == "thd" else x

    def write(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk's keys/values (1, G, n, D) at sequence positions [start, start + n).

        Positions past the buffers' capacity are not kept: nothing reads them."""
        end = min(start + k.shape[2], self.capacity)
        if start >= end:
            return
        if self.k[layer_idx] is None:
            self._allocate(k)
        n = end - start
        if self.layout == "thd":
            self.k[layer_idx][start:end] = self.as_layout(k)[:n]
            self.v[layer_idx][start:end] = self.as_layout(v)[:n]
        else:
            self.k[layer_idx][:, :, start:end] = k[:, :, :n]
            self.v[layer_idx][:, :, start:end] = v[:, :, :n]

    def keys(self, layer_idx: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end): views in this layout, no copy."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        if self.layout == "thd":
            return k[start:end], v[start:end]
        return k[:, :, start:end], v[:, :, start:end]

    def add_grad(self, layer_idx: int, start: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Add gradients of positions [start, start + n) (given in this layout)."""
        grad_k, grad_v = self.grad_k[layer_idx], self.grad_v[layer_idx]
        if self.layout == "thd":
            end = start + dk.shape[0]
            grad_k[start:end] += dk.to(grad_k.dtype)
            grad_v[start:end] += dv.to(grad_v.dtype)
        else:
            end = start + dk.shape[2]
            grad_k[:, :, start:end] += dk.to(grad_k.dtype)
            grad_v[:, :, start:end] += dv.to(grad_v.dtype)

    def own_grads(self, layer_idx: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What later chunks sent back for positions [start, start + n), as (1, G, n, D)."""
        grad_k, grad_v = self.grad_k[layer_idx], self.grad_v[layer_idx]
        if self.layout == "thd":
            return (grad_k[start:start + n].transpose(0, 1)[None],
                    grad_v[start:start + n].transpose(0, 1)[None])
        return grad_k[:, :, start:start + n], grad_v[:, :, start:start + n]

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
