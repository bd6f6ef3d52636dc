"""Compiled decoder layers (``ChunkingOptions(compile=True)``, ``--train.compile``).

Regional compilation, as torchtitan does it: each decoder layer's ``forward`` is compiled with
``torch.compile`` (inductor), and identical layers share one graph. Uniform chunks keep its shapes
static: the one dimension that varies is the chunk's token count (a batch's last chunk may be
short), which torch's automatic dynamic shapes turn symbolic at its first change, so a run
compiles each graph at most twice (the full chunk, then any other length). Grad mode is part of
a graph's key: training forwards, state-only forwards and evaluations compile their own.

The chunk attention is not traced. It reads and writes the chain's key/value state and carries a
kernel, the chunk's segments and kept outputs: Python state that changes every chunk and that
dynamo would guard on (a recompile per chunk layout). Inside a compiled layer it is a pair of
custom ops (``torch.library``) that the graph calls as one node each:

* ``chunkflow::chunk_attention(q, k, v, scale) -> (out, lse, handle)`` runs
  :func:`chunkflow.runtime.attention.attend` for the chunk the engine is running
  (:func:`running`) and the layer being called (set by the layer's wrapper, outside the
  graph). ``lse`` is the kernel's log-sum-exp as (H, L) (any kernel's, whatever its layout);
  ``handle`` is a (2,) int64 host tensor naming the chunk and the layer, which the graph saves
  for the backward.
* ``chunkflow::chunk_attention_backward(dout, q, k, v, out, lse, scale, handle) -> (dq, dk,
  dv)`` runs :func:`~chunkflow.runtime.attention.attend_backward` for the chunk and layer the
  handle names.

The graph saves q, k, v, out and lse, as the eager Function does, so activation checkpointing
frees them as it frees the rest of a layer. Neither the prefix length nor the segments enter
the graph: they reach the kernel through the chunk, as in eager mode. A chunk is found by its
handle while its :class:`~chunkflow.runtime.chunk_call.ChunkAttention` lives (the engine's
:class:`~chunkflow.runtime.step.ChunkGraph` keeps it until the chunk's backward).

Compiled layers run under 1F1B pipeline stages, DDP, FSDP2 and tensor parallelism (exact on
gloo: ``tests/parallel/test_gradients.py``; NCCL has not run them). Not combined: the zero-bubble
schedules' split backward. A compiled layer's backward is one autograd node, so its input and
weight gradients cannot run apart (torch's own zero-bubble schedules refuse compiled stages for
the same reason); :class:`chunkflow.parallel.ParallelEngine` refuses the pair, with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref

import torch
import torch.utils.checkpoint
from torch import nn

from chunkflow.runtime.attention import arrange, attend, attend_backward
from chunkflow.runtime.chunk_call import attention_inputs

_chunks: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_keys = itertools.count()


class _Current:
    """The chunk compiled layers attend in, and the layer being called. Plain process state,
    not thread-local: a CUDA backward (and the recompute activation checkpointing runs in
    it) runs in autograd's device thread."""

    chunk = None
    layer: int | None = None


_current = _Current()


@contextlib.contextmanager
def running(chunk):
    """The chunk ``chunk`` (a :class:`~chunkflow.runtime.chunk_call.ChunkAttention`) is the one
    compiled layers attend in: around its forward, and around its backward (where activation
    checkpointing runs the layers again)."""
    if getattr(chunk, "compiled_key", None) is None:
        chunk.compiled_key = next(_keys)
        _chunks[chunk.compiled_key] = chunk
    previous = _current.chunk
    _current.chunk = chunk
    try:
        yield
    finally:
        _current.chunk = previous


def _running_chunk(layer: int):
    chunk = _current.chunk
    if chunk is None:
        raise RuntimeError(f"layer {layer}: a compiled decoder layer ran outside a chunk; "
                           f"compiled layers run only inside the ChunkFlowEngine")
    return chunk


def _chunk_of(handle: torch.Tensor):
    key, layer = handle.tolist()
    chunk = _chunks.get(key)
    if chunk is None:
        raise RuntimeError(f"layer {layer}: the backward of a compiled chunk attention ran "
                           f"after its chunk was released")
    return chunk, layer


def _lse_rows(lse: torch.Tensor, heads: int, rows: int, n: int) -> torch.Tensor:
    """A kernel's LSE (H * n values, any layout) as (H, rows), rows past ``n`` zero."""
    flat = lse.reshape(heads, n).contiguous()
    return flat if n == rows else torch.nn.functional.pad(flat, (0, rows - n))


def _like(template: torch.Tensor, value: torch.Tensor, n: int) -> torch.Tensor:
    """``value`` (its first ``n`` rows along dim 2) in ``template``'s shape and strides, as the
    fake implementation promised the compiled graph; the rows past ``n`` zero."""
    if value.shape == template.shape and value.stride() == template.stride():
        return value
    out = torch.zeros_like(template) if n < template.shape[2] else torch.empty_like(template)
    out[:, :, :n].copy_(value)
    return out


@torch.library.custom_op("chunkflow::chunk_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layer = _current.layer
    chunk = _running_chunk(layer)
    n, layout = chunk.num_tokens, chunk.kernel.state_layout
    q_, k_, v_ = (arrange(t[:, :, :n], layout) for t in (q, k, v))
    result, _, lse = attend(q_, k_, v_, chunk.view(layer, scale), chunk.kernel, layer,
                            chunk.kept)
    chunk.lse_shapes[layer] = lse.shape
    if chunk.kept is not None:
        # Kept (or reused) tensors live on outside the graph, which must not write into them.
        result, lse = result.clone(), lse.clone()
    handle = torch.tensor([chunk.compiled_key, layer], dtype=torch.int64)
    return _like(q, result, n), _lse_rows(lse, q.shape[1], q.shape[2], n), handle


@_attention_op.register_fake
def _(q, k, v, scale):
    lse = q.new_empty(q.shape[1], q.shape[2], dtype=torch.promote_types(q.dtype, torch.float32))
    return torch.empty_like(q), lse, torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.custom_op("chunkflow::chunk_attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                           handle: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chunk, layer = _chunk_of(handle)
    n, kernel = chunk.num_tokens, chunk.kernel
    q_, k_, v_, out_ = (arrange(t[:, :, :n], kernel.state_layout) for t in (q, k, v, out))
    lse_ = lse[:, :n].reshape(chunk.lse_shapes[layer])
    dq, dk, dv = attend_backward(dout[:, :, :n], q_, k_, v_, out_, lse_,
                                 chunk.view(layer, scale), kernel)
    return _like(q, dq, n), _like(k, dk, n), _like(v, dv, n)


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, scale, handle):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse, handle = output
    ctx.save_for_backward(q, k, v, out, lse, handle)
    ctx.scale = scale


def _backward(ctx, dout, dlse, dhandle):
    q, k, v, out, lse, handle = ctx.saved_tensors
    dq, dk, dv = torch.ops.chunkflow.chunk_attention_backward(dout, q, k, v, out, lse,
                                                              ctx.scale, handle)
    return dq, dk, dv, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              scale: float | None = None) -> torch.Tensor:
    """The ``attention`` a compiled layer calls (the engine passes it in place of the chunk's
    :class:`~chunkflow.runtime.chunk_call.ChunkAttention`): the same contract, through the
    custom op. ``layer_idx`` is not read: a layer index in the graph would make each layer
    compile its own."""
    q, k, v, scale = attention_inputs(q, k, v, scale)
    if torch.compiler.is_compiling():
        return torch.ops.chunkflow.chunk_attention(q, k, v, scale)[0]
    # Run eagerly: after a graph break, or in a recompute that torch's checkpoint runs with
    # dynamo off (transformers checkpoints inside the layer's forward, past its wrapper).
    COUNTER.eager_calls += 1
    with _layer(layer_idx):
        return torch.ops.chunkflow.chunk_attention(q, k, v, scale)[0]


@contextlib.contextmanager
def _layer(layer_idx: int):
    previous = _current.layer
    _current.layer = layer_idx
    try:
        yield
    finally:
        _current.layer = previous


class CompileCounter:
    """The backend :func:`compile_layers` hands to ``torch.compile``: inductor, counting the
    graphs it compiles (one per layer kind, grad mode and shape kind; a recompile is one more).
    One per process (:data:`COUNTER`): dynamo keeps a compiled graph for a backend, so layers
    of every engine share the graphs compiled for another's."""

    def __init__(self):
        self.graphs = 0
        self.eager_calls = 0
        """Attention calls of compiled layers that ran outside a graph (after a graph break,
        or in a recompute with dynamo off): a layer that did not run compiled."""

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return inductor_backend()(graph_module, example_inputs)


COUNTER = CompileCounter()


def inductor_backend():
    """torch's inductor backend as a callable (what ``backend="inductor"`` names), so that
    :class:`CompileCounter` can count its compiles. The one private torch name of this module
    (``tests/runtime/test_compiled.py`` fails when a release renames it)."""
    from torch._dynamo import lookup_backend

    return lookup_backend("inductor")


def compile_layers(layers, *, checkpoint: bool = False) -> None:
    """Compile each decoder layer's ``forward`` in place (parameter names do not change); a
    compiled layer's call first names its layer for the attention op, outside the graph.
    :data:`COUNTER` counts the graphs compiled.

    ``checkpoint``: per-layer activation checkpointing (non-reentrant) around the compiled
    layer, so that the recompute runs the same graph. (transformers checkpoints inside a
    layer's forward, which dynamo cannot trace as one graph with chunkflow's attention: the
    layer would run eagerly.)"""
    for layer in layers:
        if getattr(layer, "_chunkflow_compiled", False):
            continue
        compiled = torch.compile(layer.forward, backend=COUNTER)

        def run(*args, _compiled=compiled, _layer_idx=_layer_index(layer), **kwargs):
            with _layer(_layer_idx):
                return _compiled(*args, **kwargs)

        if checkpoint:
            def forward(*args, _run=run, **kwargs):
                if torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(_run, *args, use_reentrant=False,
                                                             **kwargs)
                return _run(*args, **kwargs)
        else:
            forward = run
        functools.update_wrapper(forward, layer.forward)
        layer.forward = forward
        layer._chunkflow_compiled = True


def _layer_index(layer: nn.Module) -> int:
    for module in layer.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    raise ValueError(f"{type(layer).__name__}: no layer_idx found on the decoder layer or its "
                     f"modules; compiled layers need it to name their attention's layer")
