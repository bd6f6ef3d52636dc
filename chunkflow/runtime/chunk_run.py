"""Running one chunk on the model: the part of :class:`~chunkflow.runtime.engine.ChunkFlowEngine`
that its action handlers share.

* ``_forward``/``_run_chunk``: the chunk's tokens (or the previous stage's hidden states) through
  the model, each layer's attention bound to the chunk's segments and its chain's key/value
  state (:class:`~chunkflow.runtime.chunk_call.ChunkAttention`), under its dropout seed, and
  the loss of its tokens on the last stage;
* ``_backward``: the chunk's backward from its loss or from the gradient the next stage sent;
* ``_new_state``: a chain's key/value state, in the layout the step's kernel reads.

A mixin: it reads the engine's ``options``, ``model``, ``rows``, ``loss_fn``, ``meter`` and
``copier``.
"""

from __future__ import annotations

import contextlib

import torch

from chunkflow.plan import Chunk
from chunkflow.runtime.attention import KeptAttention
from chunkflow.runtime.chunk_call import BoundSegment, ChunkAttention
from chunkflow.runtime.compiled import attention as compiled_attention
from chunkflow.runtime.compiled import running
from chunkflow.runtime.kv_state import ChainState, OffloadedChainState
from chunkflow.runtime.split_backward import EmbeddingLeaf
from chunkflow.runtime.step import ChunkGraph, StepState


class ChunkRunner:
    """One chunk's forward and backward, and a chain's state (see the module docstring)."""

    def _new_state(self, st: StepState, chain) -> ChainState:
        """An empty state for ``chain`` in the layout this step's kernel reads (with gradient
        buffers when the step trains)."""
        o, kernel = self.options, st.kernel
        seq_len = st.plan.chunks[chain.chunk_ids[-1]].segments[0].start  # before the last
        capacity = kernel.state_capacity(seq_len, o.chunk_size)
        if o.offload != "none":
            return OffloadedChainState(
                layer_ids=self.model.layer_ids, seq_len=seq_len, meter=self.meter,
                copier=self.copier(st.kernel_device), with_grads=st.training,
                layout=kernel.state_layout, capacity=capacity)
        return ChainState(layer_ids=self.model.layer_ids, seq_len=seq_len, meter=self.meter,
                          with_grads=st.training, layout=kernel.state_layout, capacity=capacity)

    def _forward(self, st: StepState, chunk: Chunk, x: torch.Tensor | None, *, grad: bool,
                 with_loss: bool, kept: KeptAttention | None = None) -> "ChunkGraph":
        """Run one chunk on this model (or pipeline stage). ``x``: the hidden states the previous
        stage sent, None on the first stage (which embeds the chunk's tokens). ``with_loss``:
        compute the chunk's loss (the last stage's ``F``/``R``). ``kept``: the attention
        outputs a selective ``S`` keeps, or its ``R`` reuses.

        Returns the chunk's graph: its weighted loss (with ``with_loss``) or output hidden
        states, and the input received from the previous stage.
        """
        if st.dropout_seed is None:
            return self._run_chunk(st, chunk, x, grad=grad, with_loss=with_loss, kept=kept)
        # The same dropout masks in every forward of this chunk (S, F and R).
        device = st.kernel_device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   device_type=device.type):
            key = chunk.chunk_id if st.chunk_ids is None else st.chunk_ids[chunk.chunk_id]
            torch.manual_seed(chunk_seed(st.dropout_seed, key, self.model.layer_ids[0]))
            return self._run_chunk(st, chunk, x, grad=grad, with_loss=with_loss, kept=kept)

    def _run_chunk(self, st: StepState, chunk: Chunk, x: torch.Tensor | None, *, grad: bool,
                   with_loss: bool, kept: KeptAttention | None = None) -> "ChunkGraph":
        state = st.states.get(chunk.chain_id)  # None for a standalone chunk
        segments, offset = [], 0
        for i, seg in enumerate(chunk.segments):
            is_chain = i == 0 and chunk.chain_id is not None
            segments.append(BoundSegment(offset, seg.num_tokens, seg.start,
                                         state if is_chain else None))
            offset += seg.num_tokens
        device, rows = st.kernel_device, self.rows
        leaf = None
        if x is None:
            # (n,) per segment, laid out segment after segment -> (1, L); under sequence
            # parallelism the rows this rank embeds (ChunkRows.input_ids)
            x = rows.input_ids(torch.cat([st.ids[s.seq_id][s.start:s.end]
                                          for s in chunk.segments]))[None]
            inputs = None
            if grad and chunk.chunk_id in st.split:
                # A split backward needs a leaf to stop at: the embedding's output becomes one
                # (its own backward runs in the W).
                leaf = EmbeddingLeaf(getattr(self.model, "input_embedding", lambda: None)())
        else:
            inputs = x = x.detach().requires_grad_(grad)  # (1, L, E); its grad goes back
        # (1, L): every position of the chunk (its attention runs over the whole chunk)
        position_ids = rows.positions(torch.cat([torch.arange(s.start, s.end, device=device)
                                                 for s in chunk.segments]))[None]
        # Only a chain chunk followed by more chunks receives gradients for its own keys/values.
        has_successor = (chunk.chain_id is not None
                         and chunk.chain_idx < st.plan.chains[chunk.chain_id].num_chunks - 1)
        attention = ChunkAttention(segments, st.kernel, block_size=self.options.chunk_size,
                                   has_successor=has_successor, kept=kept)
        compiled = self.options.compile
        with torch.set_grad_enabled(grad), leaf or contextlib.nullcontext(), \
                running(attention) if compiled else contextlib.nullcontext():
            hidden = self.model.hidden_states(
                x, position_ids=position_ids,
                attention=compiled_attention if compiled else attention,
                activation_checkpointing=self.options.activation_checkpointing and not compiled)
        embedded = None
        if leaf is not None:
            inputs, embedded = leaf.leaf, leaf.output
        graph_attention = attention if compiled else None
        if not with_loss:
            # Not the last stage (hidden states go on), or a state-only forward on the last.
            return ChunkGraph(hidden, inputs, embedded, graph_attention)
        with torch.set_grad_enabled(grad):
            targets, weights = rows.loss_rows(
                torch.cat([st.targets[s.seq_id][s.start:s.end] for s in chunk.segments]),
                torch.cat([st.weights[s.seq_id][s.start:s.end] for s in chunk.segments]))
            loss = self.loss_fn(hidden[0], self.model.lm_head, targets, weights,
                                logits_budget=self.options.logits_budget,
                                cast_cache=st.cast_cache)
        return ChunkGraph(loss, inputs, embedded, graph_attention)

    def _backward(self, graph: "ChunkGraph", grad_output: torch.Tensor | None) -> None:
        """Backward of one chunk: its loss (or, on an earlier pipeline stage, its output with the
        gradient the next stage sent). What later chunks of its chain sent back for its own
        keys/values enters in the attention's backward (:mod:`chunkflow.runtime.attention`).

        An output that does not require grad (everything before it frozen) needs nothing.
        Layers that activation checkpointing recomputes here see the chunk's attention again
        (the model's ``step_scope``, around every action)."""
        if graph.output.requires_grad:
            with (contextlib.nullcontext() if graph.attention is None
                  else running(graph.attention)):
                torch.autograd.backward([graph.output], [grad_output])


def chunk_seed(step_seed: int, chunk_key: int, first_layer: int) -> int:
    """The seed of a chunk's dropout masks on the stage whose first layer is ``first_layer``:
    ``step_seed + chunk_key`` on the first stage (one process included), another stream on each
    later one, so a stage does not repeat its predecessor's masks. The stage term reaches the
    low 32 bits, all that the CPU generator keeps of a seed."""
    return (step_seed + chunk_key + 0x9E3779B97F4A7C15 * first_layer) % (1 << 64)
