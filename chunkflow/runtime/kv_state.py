"""Key/value state of one chain: what later chunks attend to, and the gradients they send back.

Per layer (the layers of this model or pipeline stage, by global index): post-RoPE keys and values of the sequence up to the chain's last chunk (no later chunk
reads the last one's), shape (1, G, T, D) with the un-expanded key/value heads (G, not H), filled
chunk by chunk as forward runs. Gradients live in float32 buffers (or the key dtype where that is
wider) and accumulate as later chunks run backward. All buffers are allocated at the first write,
in the dtype of the keys actually produced (bf16 under autocast, whatever the weights), all
layers at once rather than interleaved with the first chunk's activations. The engine frees the
state once the chain's first chunk has run backward.
"""

from __future__ import annotations

from typing import Sequence

import torch

from chunkflow.runtime.memory import MemoryMeter


class ChainState:
    def __init__(self, *, layer_ids: Sequence[int], seq_len: int, meter: MemoryMeter,
                 with_grads: bool = True):
        """``with_grads=False``: keys and values only (a forward-only pass, e.g. evaluation)."""
        self.seq_len, self.with_grads = seq_len, with_grads
        self.k: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self.v: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self.grad_k: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self.grad_v: dict[int, torch.Tensor | None] = dict.fromkeys(layer_ids)
        self._meter = meter
        self._nbytes = 0

    def write(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk's keys/values (1, G, n, D) at sequence positions [start, start + n).

        Positions past the state's length (the chain's last chunk) are not kept: nothing reads them.
        """
        if start >= self.seq_len:
            return
        if self.k[layer_idx] is None:
            self._allocate(k)
        n = k.shape[2]
        self.k[layer_idx][:, :, start:start + n] = k
        self.v[layer_idx][:, :, start:start + n] = v

    def _allocate(self, like: torch.Tensor) -> None:
        # (1, G, n, D) -> (1, G, T, D) for every layer
        shape = (*like.shape[:2], self.seq_len, like.shape[3])
        grad_dtype = torch.promote_types(like.dtype, torch.float32)
        parts = [(self.k, like.dtype), (self.v, like.dtype)]
        if self.with_grads:
            parts += [(self.grad_k, grad_dtype), (self.grad_v, grad_dtype)]
        for buffers, dtype in parts:
            for layer_idx in buffers:
                buffers[layer_idx] = torch.zeros(shape, dtype=dtype, device=like.device)
                self._nbytes += buffers[layer_idx].nbytes
        self._meter.add(self._nbytes)

    def grads(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient buffers (grad_k, grad_v) of one layer."""
        return self.grad_k[layer_idx], self.grad_v[layer_idx]

    def free(self) -> None:
        self.k, self.v, self.grad_k, self.grad_v = {}, {}, {}, {}
        self._meter.add(-self._nbytes)
        self._nbytes = 0
