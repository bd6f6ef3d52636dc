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
* ``I`` then ``W`` (a zero-bubble pipeline schedule's): the same backward in two passes, first
  to the stage input and the chain state, later to the parameters
  (:mod:`chunkflow.runtime.split_backward`).

Gradients accumulate into ``.grad`` exactly as ``loss.backward()`` of unchunked training would.

Dropout (e.g. LoRA's) draws its masks from a generator seeded per chunk and step, so a chunk's
``S``, ``F`` and ``R`` see the same mask and the recompute reproduces the forward exactly.

``evaluate(batch)`` is the forward alone: the forward-only schedule
(:func:`chunkflow.plan.forward_only`: every chunk once, in chain order) under ``no_grad``,
keeping only the chain's key/value state, and returns the sum of the token losses and their
number (held-out loss with the memory of one chunk).

The executor is one handler per action kind over one step state
(:class:`~chunkflow.runtime.step.StepState`: the batch, the peers, and what actions carry to
later ones: chain states, graphs, stage inputs, kept attention outputs). A new action kind is
one handler here plus its rules in :mod:`chunkflow.plan.scheduling`. The same executor runs one
pipeline stage: the model is then a stage (the whole model minus other stages' modules), the
actions are that stage's list from :func:`chunkflow.plan.state_aware_1f1b`, a :class:`StageIO`
receives inputs and sends outputs and their gradients (and says whether this stage computes the
loss), a :class:`GradSync` supplies the global loss normaliser and the data-parallel gradient
synchronisation, and a :class:`~chunkflow.runtime.chunk_call.ChunkRows` says which rows of a
chunk this rank runs (sequence parallelism). A single device is a one-stage pipeline with no
peers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from chunkflow.plan import (Action, ActionKind, Chunk, ChunkPlan, build_chunks, forward_only,
                            schedule)
from chunkflow.runtime.attention import KeptAttention, get_kernel
from chunkflow.runtime.attention.select import model_heads
from chunkflow.runtime.chunk_call import ChunkModel, ChunkRows
from chunkflow.runtime.chunk_run import ChunkRunner
from chunkflow.runtime.compiled import compile_layers
from chunkflow.runtime.devices import normalize_device
from chunkflow.runtime.head_loss import head_loss
from chunkflow.runtime.inputs import prepare_batch
from chunkflow.runtime.kv_state import Copier
from chunkflow.runtime.loss import (
    IGNORE_INDEX,
    shift_labels,
    token_weights,
)
from chunkflow.runtime.memory import MemoryMeter
from chunkflow.runtime.options import ChunkingOptions
from chunkflow.runtime.peers import GradSync, StageIO
from chunkflow.runtime.split_backward import WeightWork, input_backward, weight_backward
from chunkflow.runtime.step import ChunkGraph, EvalResult, StepResult, StepState


class ChunkFlowEngine(ChunkRunner):
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
                 sequence_shard: ChunkRows | None = None, loss_fn=None, **kwargs):
        """``options``: a :class:`ChunkingOptions`, or its fields as keyword arguments.
        ``sequence_shard``: under sequence parallelism, the rows of each chunk this rank runs
        outside the tensor-parallel matmuls (:class:`chunkflow.parallel.tensor.SequenceShard`,
        a :class:`~chunkflow.runtime.chunk_call.ChunkRows`); the model's layers gather the chunk
        for attention and the MLP. ``loss_fn``: a chunk's loss from its
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
        self.rows = sequence_shard or ChunkRows()
        self.loss_fn = loss_fn or head_loss
        self._copier: Copier | None = None
        self._kernels: dict[tuple, Any] = {}  # (backend, device, dtype, heads) -> kernel
        self._action_hooks: dict[object, Any] = {}
        if options.compile:
            if not hasattr(model, "decoder_layers"):
                raise ValueError(f"compile=True compiles the decoder layers, and "
                                 f"{type(model).__name__} does not name them (decoder_layers())")
            # (compiled layers checkpoint themselves, around the compiled graph)
            compile_layers(model.decoder_layers(), checkpoint=options.activation_checkpointing)
        else:
            if any(getattr(layer, "_chunkflow_compiled", False)
                   for layer in getattr(model, "decoder_layers", list)()):
                raise ValueError("compile=False on a model whose layers an engine with "
                                 "compile=True compiled: they call chunkflow's attention op "
                                 "only; valid: compile=True, or a fresh copy of the model")
            if options.activation_checkpointing and hasattr(
                    model, "enable_activation_checkpointing"):
                model.enable_activation_checkpointing()
        self.meter = MemoryMeter()

    @property
    def chunk_size(self) -> int:
        return self.options.chunk_size

    @property
    def k(self) -> int:
        return self.options.k

    def register_action_hook(self, hook) -> "_HookHandle":
        """Call ``hook(action, phase)`` with phase "start" before and "end" after every action
        of a step (``Action`` of :mod:`chunkflow.plan`: ``F``/``S``/``R``/``B``/``I``/``W``,
        selective ``s``/``r``); returns a handle whose ``remove()`` unregisters it. "start" comes once the
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
        backend, heads = self.options.attention_backend, model_heads(self.config)
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
        o, sync = self.options, sync or GradSync()
        ids_list, labels_list = self._prepare(batch)
        device, dtype = self._param().device, self._param().dtype
        acc = torch.promote_types(dtype, torch.float32)
        targets = [shift_labels(labels) for labels in labels_list]
        plan = self._plan(ids_list, plan)
        weights, num_loss_tokens = token_weights(targets, o.loss_normalization, acc,
                                                 totals=sync.global_counts)
        actions = (schedule(plan, k=o.k, recompute=o.recompute) if actions is None
                   else list(actions))
        st = StepState(plan, ids_list, targets, weights, self._kernel(device), device,
                        io or StageIO(), sync, training=True, dropout_seed=self._dropout_seed(),
                        chunk_ids=chunk_ids,
                        total=torch.zeros((), dtype=torch.float64 if device.type == "cpu"
                                          else acc, device=device))
        self.meter.reset(exclude=list(self.model.parameters()))
        if self._copier is not None:
            self._copier.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if num_loss_tokens == 0:
            # Nothing is supervised: loss 0 and zero gradients, as the unchunked loss would give.
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        else:
            self._execute(st, actions)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else self.meter.peak)
        return StepResult(loss=st.total.to(acc), num_loss_tokens=num_loss_tokens,
                          num_chunks=plan.num_chunks, num_tokens=plan.num_tokens,
                          peak_memory_bytes=peak, plan=plan)

    @torch.no_grad()
    def evaluate(self, batch, *, plan: ChunkPlan | None = None,
                 io: StageIO | None = None) -> EvalResult:
        """Forward-only loss of ``batch``: the sum of its supervised tokens' cross-entropy and
        their number, chunk by chunk (:func:`chunkflow.plan.forward_only`: chains in order,
        keeping only their KV state), run by the same executor as training. With ``io`` and
        ``plan``, this pipeline stage's part (the last stage holds the loss)."""
        ids_list, labels_list = self._prepare(batch)
        device, dtype = self._param().device, self._param().dtype
        acc = torch.promote_types(dtype, torch.float32)
        targets = [shift_labels(labels) for labels in labels_list]
        plan = self._plan(ids_list, plan)
        weights = [(t != IGNORE_INDEX).to(acc) for t in targets]  # sum, not mean
        num_loss_tokens = int(sum(int(w.sum()) for w in weights))
        st = StepState(plan, ids_list, targets, weights, self._kernel(device), device,
                        io or StageIO(), GradSync(), training=False,
                        total=torch.zeros((), dtype=torch.float64, device=device))
        self._execute(st, forward_only(plan))
        return EvalResult(loss_sum=float(st.total), num_loss_tokens=num_loss_tokens,
                          num_tokens=plan.num_tokens, num_chunks=plan.num_chunks)

    def _plan(self, ids_list: list[torch.Tensor], plan: ChunkPlan | None) -> ChunkPlan:
        """The batch's chunk plan: ``plan`` checked against the batch, else built."""
        o, seq_lens = self.options, [len(x) for x in ids_list]
        if plan is None:
            return build_chunks(seq_lens, chunk_size=o.chunk_size,
                                pack_chain_tails=o.pack_chain_tails)
        if list(plan.seq_lens) != seq_lens or plan.chunk_size != o.chunk_size:
            raise ValueError(f"plan (chunk_size {plan.chunk_size}, sequence lengths "
                             f"{list(plan.seq_lens)}) does not match the engine's chunk_size "
                             f"{o.chunk_size} and the batch's lengths {seq_lens}")
        return plan

    def _dropout_seed(self) -> int | None:
        """A seed for this step's dropout masks when the model has active dropout, else None.
        Drawn from torch's global generator, so it is part of a checkpoint's RNG state."""
        module = getattr(self.model, "module", self.model)
        if not any(isinstance(m, nn.Dropout) and m.p > 0 and m.training
                   for m in module.modules()):
            return None
        return int(torch.randint(0, 2**62, (1,)))

    # -- the executor: one handler per action kind ------------------------------------------

    def _execute(self, st: StepState, actions: list[Action]) -> None:
        """Run ``actions`` (Algorithm 2's schedule, a pipeline stage's, or forward-only) over
        the step state ``st``. A chain's key/value state lives from its first action to its
        last but ``W`` (which neither reads nor writes it: the attention saved the chunk's own
        keys and values); everything the actions carry between them must be gone at the
        end."""
        plan = st.plan
        last_use = {}  # chain id -> index of the last action that reads its state
        for i, action in enumerate(actions):
            chain_id = plan.chunks[action.chunk_id].chain_id
            if chain_id is not None and action.kind is not ActionKind.WEIGHT_BACKWARD:
                last_use[chain_id] = i
        # the last action that adds parameter gradients runs the data-parallel sync
        backwards = [i for i, a in enumerate(actions)
                     if a.kind in (ActionKind.BACKWARD, ActionKind.WEIGHT_BACKWARD)]
        st.last_backward = backwards[-1] if backwards else None
        st.split = {a.chunk_id for a in actions if a.kind is ActionKind.INPUT_BACKWARD}
        if st.split and self.options.activation_checkpointing:
            raise ValueError("a zero-bubble pipeline schedule (I/W actions) with activation "
                             "checkpointing: the weight pass would recompute every layer a "
                             "second time. Valid: --parallel.schedule=1f1b, or turn "
                             "--chunking.activation_checkpointing off")
        # On CUDA the peak comes from the allocator; the saved-tensor hooks would be pure overhead.
        hooks = (self.meter.hooks() if st.training and st.kernel_device.type != "cuda"
                 else contextlib.nullcontext())
        scope = getattr(self.model, "step_scope", contextlib.nullcontext)
        try:
            with hooks, scope():
                for i, action in enumerate(actions):
                    st.io.start(action)
                    chunk = plan.chunks[action.chunk_id]
                    chain = (plan.chain_of(chunk)
                             if action.kind is not ActionKind.WEIGHT_BACKWARD else None)
                    if chain is not None and chain.chain_id not in st.states:
                        st.states[chain.chain_id] = self._new_state(st, chain)
                    match action.kind:
                        case ActionKind.STATE_FORWARD:
                            self._state_forward(st, action, chunk)
                        case ActionKind.FORWARD:
                            self._forward_action(st, action, chunk)
                        case ActionKind.RECOMPUTE:
                            self._recompute(st, action, chunk)
                        case ActionKind.BACKWARD:
                            self._backward_action(st, action, chunk, last=i == st.last_backward)
                        case ActionKind.INPUT_BACKWARD:
                            self._input_backward_action(st, action, chunk)
                        case ActionKind.WEIGHT_BACKWARD:
                            self._weight_backward_action(st, action,
                                                         last=i == st.last_backward)
                    if chain is not None and last_use[chain.chain_id] == i:
                        st.states.pop(chain.chain_id).free()
                    if self._action_hooks:
                        self._notify(action, "end")
            assert not (st.graphs or st.states or st.stage_inputs or st.kept
                        or st.weight_work), \
                "schedule left graphs, state, stage inputs or kept attention outputs behind"
            st.sync.finish()
        finally:  # only has work left when a step failed: drop its graphs and state
            st.graphs.clear()
            st.weight_work.clear()
            st.stage_inputs.clear()
            st.kept.clear()
            for state in st.states.values():
                state.free()

    def _started(self, action: Action) -> None:
        if self._action_hooks:  # timing starts once the input is here
            self._notify(action, "start")

    def _state_forward(self, st: StepState, action: Action, chunk: Chunk) -> None:
        """``S``/``s``: fill the chain's key/value state, no graph; keep the stage input for
        the ``R`` (and, selective, every layer's attention output for the ``r``)."""
        x = st.io.recv_forward(chunk)
        self._started(action)
        if x is not None:
            st.stage_inputs[chunk.chunk_id] = x
        keep = None
        if action.selective:
            copier = self.copier(st.kernel_device) if self.options.offload == "all" else None
            keep = st.kept[chunk.chunk_id] = KeptAttention(self.meter, copier,
                                                           self.model.layer_ids)
        graph = self._forward(st, chunk, x, grad=False, with_loss=False, kept=keep)
        if not st.io.is_last_stage:
            st.io.send_forward(chunk, graph.output.detach())

    def _forward_action(self, st: StepState, action: Action, chunk: Chunk) -> None:
        """``F``: the chunk's forward, its graph kept for its ``B``; forward-only (evaluation):
        no graph, the loss added at once."""
        x = st.io.recv_forward(chunk)
        self._started(action)
        last = st.io.is_last_stage
        graph = self._forward(st, chunk, x, grad=st.training, with_loss=last)
        if not last:
            st.io.send_forward(chunk, graph.output.detach())
        if st.training:
            st.graphs[chunk.chunk_id] = graph
        elif last:
            st.total += graph.output.double()

    def _recompute(self, st: StepState, action: Action, chunk: Chunk) -> None:
        """``R``/``r``: the chunk's forward again from the input its ``S`` kept (nothing is
        received or sent), right before its ``B``; ``r`` reuses the kept attention outputs."""
        x = st.stage_inputs.pop(chunk.chunk_id, None)
        self._started(action)
        keep = None
        if action.selective:
            keep = st.kept.pop(chunk.chunk_id)
            keep.start_reuse()
        st.graphs[chunk.chunk_id] = self._forward(st, chunk, x, grad=True,
                                                  with_loss=st.io.is_last_stage, kept=keep)

    def _backward_action(self, st: StepState, action: Action, chunk: Chunk, *,
                         last: bool) -> None:
        """``B``: the chunk's backward; its input's gradient goes back to the previous stage,
        its loss into the step's."""
        graph = st.graphs.pop(chunk.chunk_id)
        grad_output = st.io.recv_backward(chunk)
        self._started(action)
        st.sync.before_backward(last=last)
        self._backward(graph, grad_output)
        self._backward_done(st, chunk, graph)

    def _backward_done(self, st: StepState, chunk: Chunk, graph: ChunkGraph) -> None:
        """After a ``B`` or ``I``: the input's gradient goes back to the previous stage (none
        on the first), the chunk's loss into the step's (on the last)."""
        if graph.input is not None and graph.embedded is None:
            grad_input = graph.input.grad
            st.io.send_backward(chunk, grad_input if grad_input is not None
                                else torch.zeros_like(graph.input))
        if st.io.is_last_stage:
            st.total += graph.output.detach()  # the chunk's loss

    def _input_backward_action(self, st: StepState, action: Action, chunk: Chunk) -> None:
        """``I``: the backward to the stage input and the chain's key/value state only; the
        input's gradient goes back to the previous stage, the loss into the step's, and the
        graph stays for the ``W`` (:mod:`chunkflow.runtime.split_backward`)."""
        graph = st.graphs.pop(chunk.chunk_id)
        grad_output = st.io.recv_backward(chunk)
        self._started(action)
        params = list(self.model.parameters())
        if graph.output.requires_grad:
            work = input_backward(graph.output, grad_output, [graph.input], params)
        else:  # everything before the output is frozen: nothing to do
            work = WeightWork()
        if graph.embedded is not None and graph.embedded.requires_grad \
                and graph.input.grad is not None:  # first stage: the embedding's is the W's too
            embedding = self.model.input_embedding()
            work.add([get_gradient_edge(graph.embedded)], [graph.input.grad],
                     [p for p in embedding.parameters() if p.requires_grad])
        self._backward_done(st, chunk, graph)
        st.weight_work[chunk.chunk_id] = work

    def _weight_backward_action(self, st: StepState, action: Action, *, last: bool) -> None:
        """``W``: the parameter gradients its ``I`` left; frees the chunk's graph."""
        work = st.weight_work.pop(action.chunk_id)
        self._started(action)
        st.sync.before_backward(last=last)
        weight_backward(work)

    # -- one chunk ----------------------------------------------------------------------------


class _HookHandle:
    """What :meth:`ChunkFlowEngine.register_action_hook` returns: ``remove()`` unregisters."""

    def __init__(self, remove):
        self.remove = remove
