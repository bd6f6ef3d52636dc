"""ChunkFlowEngine: one training step of a batch, chunk by chunk (Algorithms 1 and 2).

``forward_backward(batch)`` builds the chunk plan of the batch, the state-aware schedule for
``k``, and executes its actions on the model:

* ``F``/``R``: forward of the chunk with autograd on; the loss of its tokens is computed at once
  (their weights are known in advance) and the graph is kept until the chunk's ``B``;
* ``S``: forward under ``no_grad`` that only fills the chain's key/value state; a selective one
  (``s``, ``recompute="selective"``) also keeps every layer's attention output and LSE, which
  its ``r`` returns instead of running the attention kernel again;
* ``B``: backward of the chunk's loss. Each layer's attention (one call over the whole chunk,
  :mod:`chunkflow.runtime.attention`) adds the accumulated gradient of the chunk's own
  keys/values (sent back by later chunks of the chain) to theirs, and the prefix's gradients to
  the chain state in turn.

Gradients accumulate into ``.grad`` exactly as ``loss.backward()`` of unchunked training would.

Dropout (e.g. LoRA's) draws its masks from a generator seeded per chunk and step, so a chunk's
``S``, ``F`` and ``R`` see the same mask and the recompute reproduces the forward exactly.

``evaluate(batch)`` is the forward alone: every chunk once, in chain order, under ``no_grad``,
keeping only the chain's key/value state, and returns the sum of the token losses and their
number (held-out loss with the memory of one chunk).

The same executor runs one pipeline stage: the model is then a stage (the whole model minus
other stages' modules), the actions are that stage's list from
:func:`chunkflow.plan.state_aware_1f1b`, a :class:`StageIO` receives inputs and sends outputs
and their gradients, and a :class:`GradSync` supplies the global loss normaliser and the
data-parallel gradient synchronisation. A single device is a one-stage pipeline with no peers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from chunkflow.plan import Action, ActionKind, Chunk, ChunkPlan, build_chunks, schedule
from chunkflow.runtime.attention import KeptAttention, get_kernel
from chunkflow.runtime.attention.select import model_heads
from chunkflow.runtime.chunk_call import BoundSegment, ChunkAttention, ChunkModel, SequenceShard
from chunkflow.runtime.devices import normalize_device
from chunkflow.runtime.head_loss import head_loss
from chunkflow.runtime.inputs import prepare_batch
from chunkflow.runtime.kv_state import ChainState, Copier, OffloadedChainState
from chunkflow.runtime.loss import (
    IGNORE_INDEX,
    shift_labels,
    token_weights,
)
from chunkflow.runtime.memory import MemoryMeter
from chunkflow.runtime.options import ChunkingOptions
from chunkflow.runtime.peers import GradSync, StageIO


@dataclass
class StepResult:
    loss: torch.Tensor
    """The batch loss (0-dim, detached, float32 or wider)."""
    num_loss_tokens: int
    """Supervised tokens in the batch."""
    num_chunks: int
    num_tokens: int
    peak_memory_bytes: int
    """CUDA: max_memory_allocated. CPU: peak of bytes saved for backward + key/value state."""
    plan: ChunkPlan


@dataclass
class EvalResult:
    loss_sum: float
    """Sum of the supervised tokens' cross-entropy (nats)."""
    num_loss_tokens: int
    num_tokens: int
    num_chunks: int


class ChunkFlowEngine:
    """Chunked forward/backward of a causal LM with gradients equal to unchunked training.

    ``chunk_size``: most tokens per chunk. ``k``: chunks of a chain that keep their activations
    (the rest are recomputed). ``loss_normalization``: "token" or "sequence".
    ``pack_chain_tails``: also pack short sequences into chains' last chunks.
    ``attention_backend``: "auto", "cpu-flash", "varlen", "math" or a kernel object
    (:mod:`chunkflow.runtime.attention.select`). ``activation_checkpointing``: keep only each
    decoder layer's input inside a chunk and recompute the rest in its backward, a memory knob
    below ``chunk_size`` and ``k`` (for a transformers model, its own gradient checkpointing,
    switched on here; one switched on by the user works too). ``logits_budget``: bytes of
    logits a chunk's loss may hold at once; larger ones go through a fused linear
    cross-entropy (:mod:`chunkflow.runtime.head_loss`). ``recompute``: "full" (a chain's
    ``R`` runs the chunk's whole forward again) or "selective" (its ``S`` keeps each layer's
    attention output and LSE, and the ``R`` runs everything but the attention kernel).
    ``offload``: "none", "state" (the chains' key/value state lives in host memory, a layer at a
    time on the device, :class:`~chunkflow.runtime.kv_state.OffloadedChainState`) or "all"
    (also the attention outputs selective recompute keeps).

    :meth:`register_action_hook` calls a function around every action (for timing).
    """

    def __init__(self, model: nn.Module, options: ChunkingOptions | None = None, *,
                 sequence_shard: SequenceShard | None = None, loss_fn=None, **kwargs):
        """``options``: a :class:`ChunkingOptions`, or its fields as keyword arguments.
        ``sequence_shard``: under sequence parallelism, the rows of each chunk this rank runs
        outside the tensor-parallel matmuls (:mod:`chunkflow.parallel.tensor`); the model's
        layers gather the chunk for attention and the MLP. ``loss_fn``: a chunk's loss from its
        final hidden states, the head, targets and weights, like (and by default)
        :func:`chunkflow.runtime.head_loss.head_loss`; the vocabulary-parallel head brings its
        own."""
        if options is None:
            options = ChunkingOptions(**kwargs)
        elif kwargs:
            raise TypeError(f"ChunkFlowEngine takes options or keyword arguments, not both "
                            f"(got {sorted(kwargs)})")
        self.options = options
        if not isinstance(model, ChunkModel):
            # Another kind (a transformers model, PEFT-wrapped or not) runs chunks through its
            # adapter; imported only then, so the runtime needs neither transformers nor the
            # models package otherwise.
            from chunkflow.models.adapter import chunk_model

            model = chunk_model(model)
        self.model, self.config = model, model.config
        self.sequence_shard = sequence_shard
        self.loss_fn = loss_fn or head_loss
        o = options
        self.chunk_size, self.k = o.chunk_size, o.k
        self.loss_normalization, self.pack_chain_tails = o.loss_normalization, o.pack_chain_tails
        self.attention_backend = o.attention_backend
        self.activation_checkpointing = o.activation_checkpointing
        self.logits_budget = o.logits_budget
        self.recompute, self.offload = o.recompute, o.offload
        self._copier: Copier | None = None
        self._kernels: dict[tuple, Any] = {}  # (backend, device, dtype, heads) -> kernel
        self._action_hooks: dict[object, Any] = {}
        if o.activation_checkpointing and hasattr(model, "enable_activation_checkpointing"):
            model.enable_activation_checkpointing()
        self.meter = MemoryMeter()

    def register_action_hook(self, hook) -> "_HookHandle":
        """Call ``hook(action, phase)`` with phase "start" before and "end" after every action
        of a step (``Action`` of :mod:`chunkflow.plan`: ``F``/``S``/``R``/``B``, selective
        ``s``/``r``); returns a handle whose ``remove()`` unregisters it. "start" comes once the
        action's input has arrived (on a pipeline stage, after the receive from the neighbour
        stage), so start to end is the action's own work, its sends included. On CUDA the work
        is asynchronous: a timing hook synchronises the device itself."""
        key = object()
        self._action_hooks[key] = hook
        return _HookHandle(lambda: self._action_hooks.pop(key, None))

    def _notify(self, action: Action, phase: str) -> None:
        for hook in list(self._action_hooks.values()):
            hook(action, phase)

    def copier(self, device: torch.device) -> Copier:
        """The host<->device copier offloading uses (its counters tell what moved). ``cuda``
        and ``cuda:0`` are the same device here (:func:`normalize_device`)."""
        if self._copier is None or self._copier.device != normalize_device(device):
            self._copier = Copier(device)
        return self._copier

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def _kernel(self, device: torch.device):
        """The attention kernel of this step: the dtype its q/k/v will have (the autocast dtype
        under autocast) and the model's head shape decide what ``auto`` picks. Kept across
        steps: a new one would self-check again and copy its chunk boundaries to the device
        again."""
        dtype = self._param().dtype
        if torch.is_autocast_enabled(device.type) and dtype != torch.float64:
            dtype = torch.get_autocast_dtype(device.type)
        backend, heads = self.attention_backend, model_heads(self.config)
        if not isinstance(backend, str):
            return backend  # a kernel object
        key = (backend, normalize_device(device), dtype, heads)
        if key not in self._kernels:
            self._kernels[key] = get_kernel(backend, device, dtype, heads=heads)
        return self._kernels[key]

    # -- input ------------------------------------------------------------------------------

    def _prepare(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Validate the batch; return input_ids and labels per sequence, on the model's device."""
        return prepare_batch(batch, vocab_size=self.config.vocab_size,
                             device=self._param().device)

    # -- execution ----------------------------------------------------------------------------

    def forward_backward(self, batch, *, plan: ChunkPlan | None = None,
                         actions: Sequence[Action] | None = None, io: StageIO | None = None,
                         sync: GradSync | None = None,
                         chunk_ids: Sequence[int] | None = None) -> StepResult:
        """One step's forward and backward over ``batch``; gradients accumulate into ``.grad``.

        The distributed runtime (``chunkflow.parallel``) passes the rest: ``plan``, this rank's
        share of the global batch's plan (default: built from ``batch``); ``actions``, this
        pipeline stage's action list (default: :func:`chunkflow.plan.schedule`); ``io``, where
        a stage's inputs come from and its outputs go; ``sync``, the data-parallel hooks;
        ``chunk_ids``, the global batch's ids of ``plan``'s chunks (they seed dropout masks, so
        each replica's chunks draw the masks one process would).
        """
        io, sync = io or StageIO(), sync or GradSync()
        ids_list, labels_list = self._prepare(batch)
        device, dtype = self._param().device, self._param().dtype
        acc = torch.promote_types(dtype, torch.float32)
        targets = [shift_labels(labels) for labels in labels_list]
        seq_lens = [len(x) for x in ids_list]
        if plan is None:
            plan = build_chunks(seq_lens, chunk_size=self.chunk_size,
                                pack_chain_tails=self.pack_chain_tails)
        elif list(plan.seq_lens) != seq_lens or plan.chunk_size != self.chunk_size:
            raise ValueError(f"plan (chunk_size {plan.chunk_size}, sequence lengths "
                             f"{list(plan.seq_lens)}) does not match the engine's chunk_size "
                             f"{self.chunk_size} and the batch's lengths {seq_lens}")
        weights, num_loss_tokens = token_weights(targets, self.loss_normalization, acc,
                                                 totals=sync.global_counts)
        actions = (schedule(plan, k=self.k, recompute=self.recompute) if actions is None
                   else list(actions))
        step = _Step(plan, ids_list, targets, weights, self._kernel(device), device,
                     self._dropout_seed(), chunk_ids)
        self.meter.reset(exclude=list(self.model.parameters()))
        if self._copier is not None:
            self._copier.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        total = torch.zeros((), dtype=torch.float64 if device.type == "cpu" else acc,
                            device=device)
        if num_loss_tokens == 0:
            # Nothing is supervised: loss 0 and zero gradients, as the unchunked loss would give.
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        else:
            total = self._execute(step, actions, io, sync, total)

        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else self.meter.peak)
        return StepResult(loss=total.to(acc), num_loss_tokens=num_loss_tokens,
                          num_chunks=plan.num_chunks, num_tokens=plan.num_tokens,
                          peak_memory_bytes=peak, plan=plan)

    @torch.no_grad()
    def evaluate(self, batch, *, plan: ChunkPlan | None = None,
                 io: StageIO | None = None) -> EvalResult:
        """Forward-only loss of ``batch``: the sum of its supervised tokens' cross-entropy and
        their number, chunk by chunk (chains in order, keeping only their KV state). With
        ``io`` and ``plan``, this pipeline stage's part (the last stage holds the loss)."""
        io = io or StageIO()
        ids_list, labels_list = self._prepare(batch)
        device, dtype = self._param().device, self._param().dtype
        acc = torch.promote_types(dtype, torch.float32)
        targets = [shift_labels(labels) for labels in labels_list]
        if plan is None:
            plan = build_chunks([len(x) for x in ids_list], chunk_size=self.chunk_size,
                                pack_chain_tails=self.pack_chain_tails)
        weights = [(t != IGNORE_INDEX).to(acc) for t in targets]  # sum, not mean
        num_loss_tokens = int(sum(int(w.sum()) for w in weights))
        step = _Step(plan, ids_list, targets, weights, self._kernel(device), device, None, None)
        is_last_stage = self.model.lm_head is not None
        total = torch.zeros((), dtype=torch.float64, device=device)
        order = [c for chunk in plan.chunks for c in
                 ([chunk.chunk_id] if chunk.chain_id is None else
                  plan.chains[chunk.chain_id].chunk_ids if chunk.chain_idx == 0 else [])]
        state = None
        for chunk_id in order:
            chunk = plan.chunks[chunk_id]
            chain = plan.chain_of(chunk)
            if chain is not None and chunk.chain_idx == 0:
                state = self._new_state(step, chain, with_grads=False)
            io.start(Action(ActionKind.FORWARD, chunk_id))
            graph = self._forward(step, chunk, state if chain is not None else None,
                                  io.recv_forward(chunk), grad=False, with_loss=is_last_stage)
            if is_last_stage:
                total += graph.output.double()
            else:
                io.send_forward(chunk, graph.output)
            if chain is not None and chunk.chain_idx == chain.num_chunks - 1:
                state.free()
                state = None
        return EvalResult(loss_sum=float(total), num_loss_tokens=num_loss_tokens,
                          num_tokens=plan.num_tokens, num_chunks=plan.num_chunks)

    def _dropout_seed(self) -> int | None:
        """A seed for this step's dropout masks when the model has active dropout, else None.
        Drawn from torch's global generator, so it is part of a checkpoint's RNG state."""
        module = getattr(self.model, "module", self.model)
        if not any(isinstance(m, nn.Dropout) and m.p > 0 and m.training
                   for m in module.modules()):
            return None
        return int(torch.randint(0, 2**62, (1,)))

    def _execute(self, step: "_Step", actions: list[Action], io: StageIO, sync: GradSync,
                 total: torch.Tensor) -> torch.Tensor:
        plan = step.plan
        is_last_stage = self.model.lm_head is not None
        states: dict[int, ChainState] = {}
        graphs: dict[int, _Graph] = {}
        stage_inputs: dict[int, torch.Tensor] = {}  # inputs of S chunks, for their R
        kept: dict[int, KeptAttention] = {}  # attention outputs of s chunks, for their r
        last_backward = max(i for i, a in enumerate(actions) if a.kind is ActionKind.BACKWARD)
        # On CUDA the peak comes from the allocator; the saved-tensor hooks would be pure overhead.
        hooks = (contextlib.nullcontext() if step.kernel_device.type == "cuda"
                 else self.meter.hooks())
        try:
            with hooks:
                for i, action in enumerate(actions):
                    io.start(action)
                    chunk = plan.chunks[action.chunk_id]
                    chain = plan.chain_of(chunk)
                    if chain is not None and chain.chain_id not in states:
                        states[chain.chain_id] = self._new_state(step, chain)
                    state = states.get(chunk.chain_id)
                    if action.kind is ActionKind.BACKWARD:
                        graph = graphs.pop(chunk.chunk_id)
                        grad_output = io.recv_backward(chunk)
                        if self._action_hooks:  # timing starts once the input is here
                            self._notify(action, "start")
                        sync.before_backward(last=i == last_backward)
                        self._backward(graph, grad_output)
                        if graph.input is not None:
                            grad_input = graph.input.grad
                            io.send_backward(chunk, grad_input if grad_input is not None
                                             else torch.zeros_like(graph.input))
                        if is_last_stage:
                            total += graph.output.detach()  # the chunk's loss
                        # the chunk's k/v must not live into the next forward
                        del graph, grad_output
                        if chain is not None and chunk.chain_idx == 0:
                            states.pop(chain.chain_id).free()
                    else:
                        kind = action.kind
                        x = (stage_inputs.pop(chunk.chunk_id, None) if kind is ActionKind.RECOMPUTE
                             else io.recv_forward(chunk))
                        if self._action_hooks:
                            self._notify(action, "start")
                        if kind is ActionKind.STATE_FORWARD and x is not None:
                            stage_inputs[chunk.chunk_id] = x
                        keep = None
                        if action.selective and kind is ActionKind.STATE_FORWARD:
                            copier = (self.copier(step.kernel_device) if self.offload == "all"
                                      else None)
                            keep = kept[chunk.chunk_id] = KeptAttention(
                                self.meter, copier, self.model.layer_ids)
                        elif action.selective:
                            keep = kept.pop(chunk.chunk_id)
                            keep.start_reuse()
                        graph = self._forward(step, chunk, state, x,
                                              grad=kind is not ActionKind.STATE_FORWARD,
                                              kept=keep)
                        if kind is not ActionKind.RECOMPUTE and not is_last_stage:
                            io.send_forward(chunk, graph.output.detach())
                        if kind is not ActionKind.STATE_FORWARD:
                            graphs[chunk.chunk_id] = graph
                        del graph, x, keep
                    if self._action_hooks:
                        self._notify(action, "end")
            assert not graphs and not states and not stage_inputs and not kept, \
                "schedule left graphs, state, stage inputs or kept attention outputs behind"
            sync.finish()
        finally:  # only has work left when a step failed: drop its graphs and state
            graphs.clear()
            stage_inputs.clear()
            kept.clear()
            for state in states.values():
                state.free()
        return total

    def _new_state(self, step: "_Step", chain, *, with_grads: bool = True) -> ChainState:
        """An empty state for ``chain`` in the layout this step's kernel reads."""
        seq_len = step.plan.chunks[chain.chunk_ids[-1]].segments[0].start  # before the last
        if self.offload != "none":
            return OffloadedChainState(
                layer_ids=self.model.layer_ids, seq_len=seq_len, meter=self.meter,
                copier=self.copier(step.kernel_device), with_grads=with_grads,
                layout=step.kernel.state_layout,
                capacity=step.kernel.state_capacity(seq_len, self.chunk_size))
        return ChainState(layer_ids=self.model.layer_ids, seq_len=seq_len, meter=self.meter,
                          with_grads=with_grads, layout=step.kernel.state_layout,
                          capacity=step.kernel.state_capacity(seq_len, self.chunk_size))

    def _forward(self, step: "_Step", chunk: Chunk, state: ChainState | None,
                 x: torch.Tensor | None, *, grad: bool,
                 with_loss: bool | None = None, kept: KeptAttention | None = None) -> "_Graph":
        """Run one chunk on this model (or pipeline stage). ``x``: the hidden states the previous
        stage sent, None on the first stage (which embeds the chunk's tokens). ``with_loss``
        (default: ``grad``): compute the chunk's loss on the last stage. ``kept``: the
        attention outputs a selective ``S`` keeps, or its ``R`` reuses.

        Returns the chunk's graph: its weighted loss (last stage) or output hidden states,
        and the key/value outputs that will receive gradients from later chunks of its chain.
        """
        with_loss = grad if with_loss is None else with_loss
        if step.dropout_seed is None:
            return self._run_chunk(step, chunk, state, x, grad=grad, with_loss=with_loss,
                                   kept=kept)
        # The same dropout masks in every forward of this chunk (S, F and R).
        device = step.kernel_device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   device_type=device.type):
            key = chunk.chunk_id if step.chunk_ids is None else step.chunk_ids[chunk.chunk_id]
            torch.manual_seed(chunk_seed(step.dropout_seed, key, self.model.layer_ids[0]))
            return self._run_chunk(step, chunk, state, x, grad=grad, with_loss=with_loss,
                                   kept=kept)

    def _run_chunk(self, step: "_Step", chunk: Chunk, state: ChainState | None,
                   x: torch.Tensor | None, *, grad: bool, with_loss: bool,
                   kept: KeptAttention | None = None) -> "_Graph":
        segments, offset = [], 0
        for i, seg in enumerate(chunk.segments):
            is_chain = i == 0 and chunk.chain_id is not None
            segments.append(BoundSegment(offset, seg.num_tokens, seg.start,
                                     state if is_chain else None))
            offset += seg.num_tokens
        device, shard = step.kernel_device, self.sequence_shard
        if x is None:
            # (n,) per segment, laid out segment after segment -> (1, L); sequence parallel:
            # this rank's rows (1, L / tp), padded (a vocabulary-parallel embedding: all of the
            # padded rows, it hands back this rank's)
            x = torch.cat([step.ids[s.seq_id][s.start:s.end] for s in chunk.segments])
            x = (x if shard is None else shard.padded(x, 0) if shard.vocab_parallel
                 else shard.local(x, 0))[None]
            inputs = None
        else:
            inputs = x = x.detach().requires_grad_(grad)  # (1, L, E); its grad goes back
        # (1, L): every position of the chunk (its attention runs over the whole chunk)
        position_ids = torch.cat([torch.arange(s.start, s.end, device=device)
                                  for s in chunk.segments])
        position_ids = (position_ids if shard is None else shard.padded(position_ids, 0))[None]
        # Only a chain chunk followed by more chunks receives gradients for its own keys/values.
        has_successor = (chunk.chain_id is not None
                         and chunk.chain_idx < step.plan.chains[chunk.chain_id].num_chunks - 1)
        attention = ChunkAttention(segments, step.kernel, block_size=self.chunk_size,
                                    has_successor=has_successor, kept=kept)
        with torch.set_grad_enabled(grad):
            hidden = self.model.hidden_states(
                x, position_ids=position_ids, attention=attention,
                activation_checkpointing=self.activation_checkpointing)
            if self.model.lm_head is None or not with_loss:
                # Not the last stage (hidden states go on), or a state-only forward on the last.
                return _Graph(hidden, inputs)
            targets = torch.cat([step.targets[s.seq_id][s.start:s.end] for s in chunk.segments])
            weights = torch.cat([step.weights[s.seq_id][s.start:s.end] for s in chunk.segments])
            if shard is not None and shard.vocab_parallel:  # the whole chunk's loss
                targets, weights = shard.padded(targets, IGNORE_INDEX), shard.padded(weights, 0)
            elif shard is not None:  # the loss of this rank's rows: a part of the chunk's
                targets, weights = shard.local(targets, IGNORE_INDEX), shard.local(weights, 0)
            loss = self.loss_fn(hidden[0], self.model.lm_head, targets, weights,
                                logits_budget=self.logits_budget, cast_cache=step.cast_cache)
        return _Graph(loss, inputs)

    def _backward(self, graph: "_Graph", grad_output: torch.Tensor | None) -> None:
        """Backward of one chunk: its loss (or, on an earlier pipeline stage, its output with the
        gradient the next stage sent). What later chunks of its chain sent back for its own
        keys/values enters in the attention's backward (:mod:`chunkflow.runtime.attention`).

        An output that does not require grad (everything before it frozen) needs nothing.
        Layers that activation checkpointing recomputes here see the chunk's attention again
        (``recompute_scope``)."""
        if graph.output.requires_grad:
            scope = getattr(self.model, "recompute_scope", contextlib.nullcontext)
            with scope():
                torch.autograd.backward([graph.output], [grad_output])


def chunk_seed(step_seed: int, chunk_key: int, first_layer: int) -> int:
    """The seed of a chunk's dropout masks on the stage whose first layer is ``first_layer``:
    ``step_seed + chunk_key`` on the first stage (one process included), another stream on each
    later one, so a stage does not repeat its predecessor's masks. The stage term reaches the
    low 32 bits, all that the CPU generator keeps of a seed."""
    return (step_seed + chunk_key + 0x9E3779B97F4A7C15 * first_layer) % (1 << 64)


@dataclass
class _Graph:
    """What a chunk's backward needs: its loss (0-dim) or output hidden states, and the input
    received from the previous stage."""

    output: torch.Tensor
    input: torch.Tensor | None


@dataclass
class _Step:
    """What every action of one step reads: the plan and the batch's per-sequence tensors."""

    plan: ChunkPlan
    ids: list[torch.Tensor]
    targets: list[torch.Tensor]
    weights: list[torch.Tensor]
    kernel: object
    kernel_device: torch.device
    dropout_seed: int | None
    """Seed of this step's dropout masks (one generator per chunk); None: no active dropout."""
    chunk_ids: Sequence[int] | None
    """Each chunk's id in the global batch (for its dropout seed); None: the plan's own."""
    cast_cache: dict = field(default_factory=dict)
    """The head weight's autocast copy, shared by the step's chunks (see head_loss)."""


class _HookHandle:
    """What :meth:`ChunkFlowEngine.register_action_hook` returns: ``remove()`` unregisters."""

    def __init__(self, remove):
        self.remove = remove
