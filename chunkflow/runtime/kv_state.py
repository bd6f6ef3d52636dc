"""Key/value state of one chain: what later chunks attend to, and the gradients they send back.

Per layer: post-RoPE keys and values of the sequence up to the chain's last chunk (no later chunk
reads the last one's), shape (1, G, T, D) with the un-expanded key/value heads (G, not H), filled
chunk by chunk as forward runs. Gradients live in float32 buffers (or the model dtype where that is
wider) and accumulate as later chunks run backward. They are allocated with the state, before any
activation: the step's peak (the first recompute) holds all of them anyway, and allocating them
amid the churn of activations fragments the heap (measured: +170 MiB of RSS at 16K tokens). The engine drops the whole state once the chain's
first chunk has run backward.
"""

from __future__ import annotations

import torch

from chunkflow.runtime.memory import MemoryMeter


class ChainState:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                 dtype: torch.dtype, device: torch.device, meter: MemoryMeter):
        shape = (1, num_kv_heads, seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        grad_dtype = torch.promote_types(dtype, torch.float32)
        self.grad_k = [torch.zeros(shape, dtype=grad_dtype, device=device)
                       for _ in range(num_layers)]
        self.grad_v = [torch.zeros(shape, dtype=grad_dtype, device=device)
                       for _ in range(num_layers)]
        self._meter = meter
        self._nbytes = 0
        self._account(sum(t.nbytes for t in self.k + self.v + self.grad_k + self.grad_v))

    def _account(self, nbytes: int) -> None:
        self._nbytes += nbytes
        self._meter.add(nbytes)

    def write(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a chunk's keys/values (1, G, n, D) at sequence positions [start, start + n).

        Positions past the state's length (the chain's last chunk) are not kept: nothing reads them.
        """
        if start >= self.k[layer_idx].shape[2]:
            return
        n = k.shape[2]
        self.k[layer_idx][:, :, start:start + n] = k
        self.v[layer_idx][:, :, start:start + n] = v

    def grads(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient buffers (grad_k, grad_v) of one layer."""
        return self.grad_k[layer_idx], self.grad_v[layer_idx]

    def free(self) -> None:
        self.k = self.v = self.grad_k = self.grad_v = []
        self._meter.add(-self._nbytes)
        self._nbytes = 0
