"""ChunkFlowEngine: one training step of a batch, chunk by chunk (Algorithms 1 and 2).

``forward_backward(batch)`` builds the chunk plan of the batch, the state-aware schedule for
``k``, and executes its actions on the model:

* ``F``/``R``: forward of the chunk with autograd on; the loss of its tokens is computed at once
  (their weights are known in advance) and the graph is kept until the chunk's ``B``;
* ``S``: forward under ``no_grad`` that only fills the chain's key/value state;
* ``B``: backward of the chunk's loss, with the accumulated gradient of its own keys/values (sent
  back by later chunks of the chain) injected into its key/value outputs. Its attention over the
  prefix adds the prefix's gradients to the chain state in turn.

Gradients accumulate into ``.grad`` exactly as ``loss.backward()`` of unchunked training would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from chunkflow.plan import ActionKind, Chunk, ChunkPlan, build_chunks, schedule
from chunkflow.plan.chunks import check_positive_int
from chunkflow.runtime.attention import (
    ATTENTION_BACKENDS,
    PrefixKV,
    get_kernel,
    prefix_causal_attention,
)
from chunkflow.runtime.kv_state import ChainState
from chunkflow.runtime.loss import (
    IGNORE_INDEX,
    LOSS_NORMALIZATIONS,
    shift_labels,
    token_weights,
    weighted_cross_entropy,
)
from chunkflow.runtime.memory import MemoryMeter


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
class _Segment:
    """A plan segment bound to its data: where it sits in the chunk and what it attends to."""

    offset: int
    length: int
    start: int
    state: ChainState | None


class _ChunkAttention:
    """The ``attention`` callable a model sees while running one chunk."""

    def __init__(self, segments: list[_Segment], kernel, *, block_size: int, write_state: bool,
                 keep_kv: bool):
        self.segments, self.kernel, self.block_size = segments, kernel, block_size
        self.write_state, self.keep_kv = write_state, keep_kv
        self.own_kv: list[tuple[int, _Segment, torch.Tensor, torch.Tensor]] = []

    def __call__(self, layer_idx: int, q, k, v) -> torch.Tensor:
        # Under autocast, RoPE leaves q/k in float32 while v is bf16; SDPA's autocast rule
        # casts all three to the autocast dtype (float64 excepted, as autocast never casts it).
        # Do the same before anything reaches the state.
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = (t if t.dtype == torch.float64 else t.to(dtype) for t in (q, k, v))
        outs = []
        for seg in self.segments:
            # (1, heads, L, D) -> the segment's (1, heads, n, D)
            sl = slice(seg.offset, seg.offset + seg.length)
            q_s, k_s, v_s = q[:, :, sl], k[:, :, sl], v[:, :, sl]
            prefix = None
            if seg.state is not None:
                prefix = PrefixKV(seg.state, layer_idx, seg.start, self.block_size)
                if self.write_state:
                    seg.state.write(layer_idx, seg.start, k_s.detach(), v_s.detach())
                if self.keep_kv:
                    self.own_kv.append((layer_idx, seg, k_s, v_s))
            outs.append(prefix_causal_attention(q_s, k_s, v_s, prefix, self.kernel))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class ChunkFlowEngine:
    """Chunked forward/backward of a causal LM with gradients equal to unchunked training.

    ``chunk_size``: most tokens per chunk. ``k``: chunks of a chain that keep their activations
    (the rest are recomputed). ``loss_normalization``: "token" or "sequence".
    ``pack_chain_tails``: also pack short sequences into chains' last chunks.
    ``attention_backend``: "auto" (CPU: "sdpa"), "sdpa" or "math".
    """

    def __init__(self, model: nn.Module, *, chunk_size: int, k: int = 1,
                 loss_normalization: str = "token", pack_chain_tails: bool = True,
                 attention_backend: str = "auto"):
        chunk_size = check_positive_int("chunk_size", chunk_size)
        k = check_positive_int("k", k)
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization={loss_normalization!r}; valid: "
                             f"{', '.join(LOSS_NORMALIZATIONS)}")
        if not hasattr(model, "hidden_states"):
            # A transformers model (or PEFT wrapper) gets a thin adapter; imported only then, so
            # the runtime needs neither transformers nor the models package otherwise.
            from chunkflow.models.hf import HFChunkModel, is_hf_model

            if not is_hf_model(model):
                raise ValueError(f"{type(model).__name__} is neither a chunkflow.models."
                                 f"Transformer nor a Hugging Face transformers causal LM")
            model = HFChunkModel(model)
        self.model, self.config = model, model.config
        self.chunk_size, self.k = chunk_size, k
        self.loss_normalization = loss_normalization
        self.pack_chain_tails = pack_chain_tails
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r}; valid: "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        self.attention_backend = attention_backend
        self.meter = MemoryMeter()

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    # -- input ------------------------------------------------------------------------------

    def _prepare(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Validate the batch; return input_ids and labels per sequence, on the model's device."""
        if isinstance(batch, torch.Tensor) and batch.dim() == 2:
            batch = list(batch)
        if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)) or len(batch) == 0:
            raise ValueError(f"batch must be a non-empty list of 1-D token tensors or of dicts "
                             f"with 'input_ids' (and optional 'labels'); got {_describe(batch)}")
        device, vocab = self._param().device, self.config.vocab_size
        ids_list, labels_list = [], []
        for i, item in enumerate(batch):
            labels = None
            if isinstance(item, dict):
                if "input_ids" not in item:
                    raise ValueError(f"batch[{i}] has keys {sorted(item)}; 'input_ids' is required")
                ids, labels = item["input_ids"], item.get("labels")
            else:
                ids = item
            ids = _as_token_tensor(ids, f"batch[{i}] input_ids")
            if ids.numel() == 0:
                raise ValueError(f"batch[{i}] is an empty sequence; every sequence needs at "
                                 f"least one token")
            _check_range(ids, vocab, f"batch[{i}] input_ids", allow_ignore=False)
            if labels is None:
                labels = ids
            else:
                labels = _as_token_tensor(labels, f"batch[{i}] labels")
                if labels.shape != ids.shape:
                    raise ValueError(f"batch[{i}]: labels shape {tuple(labels.shape)} differs from "
                                     f"input_ids shape {tuple(ids.shape)}; labels are unshifted "
                                     f"and as long as input_ids")
                _check_range(labels, vocab, f"batch[{i}] labels", allow_ignore=True)
            ids_list.append(ids.to(device))
            labels_list.append(labels.to(device))
        return ids_list, labels_list

    # -- execution ----------------------------------------------------------------------------

    def forward_backward(self, batch) -> StepResult:
        """One step's forward and backward over ``batch``; gradients accumulate into ``.grad``."""
        ids_list, labels_list = self._prepare(batch)
        device, dtype = self._param().device, self._param().dtype
        acc = torch.promote_types(dtype, torch.float32)
        targets = [shift_labels(labels) for labels in labels_list]
        weights, num_loss_tokens = token_weights(targets, self.loss_normalization, acc)
        plan = build_chunks([len(x) for x in ids_list], chunk_size=self.chunk_size,
                            pack_chain_tails=self.pack_chain_tails)
        step = _Step(plan, ids_list, targets, weights, get_kernel(self.attention_backend, device),
                     device)
        self.meter.reset(exclude=list(self.model.parameters()))
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
            total = self._execute(step, total)

        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else self.meter.peak)
        return StepResult(loss=total.to(acc), num_loss_tokens=num_loss_tokens,
                          num_chunks=plan.num_chunks, num_tokens=plan.num_tokens,
                          peak_memory_bytes=peak, plan=plan)

    def _execute(self, step: "_Step", total: torch.Tensor) -> torch.Tensor:
        cfg, plan = self.config, step.plan
        states: dict[int, ChainState] = {}
        graphs: dict[int, tuple[torch.Tensor, list]] = {}
        # On CUDA the peak comes from the allocator; the saved-tensor hooks would be pure overhead.
        hooks = (contextlib.nullcontext() if step.kernel_device.type == "cuda"
                 else self.meter.hooks())
        try:
            with hooks:
                for action in schedule(plan, k=self.k):
                    chunk = plan.chunks[action.chunk_id]
                    chain = plan.chain_of(chunk)
                    if chain is not None and chain.chain_id not in states:
                        states[chain.chain_id] = ChainState(
                            num_layers=cfg.num_hidden_layers,
                            seq_len=plan.chunks[chain.chunk_ids[-1]].segments[0].start,
                            meter=self.meter)
                    state = states.get(chunk.chain_id)
                    if action.kind is ActionKind.BACKWARD:
                        loss, own_kv = graphs.pop(chunk.chunk_id)
                        self._backward(loss, own_kv)
                        total += loss.detach()
                        del loss, own_kv  # the chunk's k/v must not live into the next forward
                        if chain is not None and chunk.chain_idx == 0:
                            states.pop(chain.chain_id).free()
                    else:
                        keep_graph = action.kind is not ActionKind.STATE_FORWARD
                        out = self._forward(step, chunk, state, grad=keep_graph,
                                            write_state=action.kind is not ActionKind.RECOMPUTE)
                        if keep_graph:
                            graphs[chunk.chunk_id] = out
                        del out
            assert not graphs and not states, "schedule left graphs or state behind"
        finally:  # only has work left when a step failed: drop its graphs and state
            graphs.clear()
            for state in states.values():
                state.free()
        return total

    def _forward(self, step: "_Step", chunk: Chunk, state: ChainState | None, *, grad: bool,
                 write_state: bool):
        """Run one chunk. With ``grad``: returns (loss, own_kv), the chunk's weighted loss and the
        key/value outputs that will receive gradients from later chunks of its chain."""
        segments, offset = [], 0
        for i, seg in enumerate(chunk.segments):
            is_chain = i == 0 and chunk.chain_id is not None
            segments.append(_Segment(offset, seg.num_tokens, seg.start,
                                     state if is_chain else None))
            offset += seg.num_tokens
        device = self._param().device
        # (n,) per segment, laid out segment after segment -> (1, L)
        input_ids = torch.cat([step.ids[s.seq_id][s.start:s.end] for s in chunk.segments])[None]
        position_ids = torch.cat([torch.arange(s.start, s.end, device=device)
                                  for s in chunk.segments])[None]
        # Only a chain chunk followed by more chunks receives gradients for its own keys/values.
        has_successor = (chunk.chain_id is not None
                         and chunk.chain_idx < step.plan.chains[chunk.chain_id].num_chunks - 1)
        attention = _ChunkAttention(segments, step.kernel, block_size=self.chunk_size,
                                    write_state=write_state, keep_kv=grad and has_successor)
        with torch.set_grad_enabled(grad):
            hidden = self.model.hidden_states(input_ids, position_ids=position_ids,
                                              attention=attention)
            if not grad:
                return None  # state-only forward: the keys/values are in the state already
            logits = self.model.lm_head(hidden)[0]  # (L, V)
            targets = torch.cat([step.targets[s.seq_id][s.start:s.end] for s in chunk.segments])
            weights = torch.cat([step.weights[s.seq_id][s.start:s.end] for s in chunk.segments])
            loss = weighted_cross_entropy(logits, targets, weights)
        return loss, attention.own_kv

    @staticmethod
    def _backward(loss: torch.Tensor, own_kv: list) -> None:
        """Backward of one chunk: its loss, plus the key/value gradients later chunks sent back.

        Keys/values that do not require grad (everything before them frozen) need nothing.
        """
        tensors, grads = [], []
        if loss.requires_grad:
            tensors, grads = [loss], [None]
        for layer_idx, seg, k_s, v_s in own_kv:
            grad_k, grad_v = seg.state.grads(layer_idx)
            sl = slice(seg.start, seg.start + seg.length)
            for t, g in ((k_s, grad_k), (v_s, grad_v)):
                if t.requires_grad:
                    tensors.append(t)
                    grads.append(g[:, :, sl].to(t.dtype))
        if tensors:
            torch.autograd.backward(tensors, grads)


@dataclass
class _Step:
    """What every action of one step reads: the plan and the batch's per-sequence tensors."""

    plan: ChunkPlan
    ids: list[torch.Tensor]
    targets: list[torch.Tensor]
    weights: list[torch.Tensor]
    kernel: object
    kernel_device: torch.device


def _describe(x: Any) -> str:
    return f"{type(x).__name__} of length {len(x)}" if hasattr(x, "__len__") else repr(x)


def _as_token_tensor(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} is not a sequence of token ids: {e}") from None
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{what} has dtype {x.dtype}; token ids must be integers (torch.long)")
    if x.dim() != 1:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; each sequence must be 1-D")
    return x.long()


def _check_range(x: torch.Tensor, vocab_size: int, what: str, *, allow_ignore: bool) -> None:
    bad = (x < 0) | (x >= vocab_size)
    if allow_ignore:
        bad &= x != IGNORE_INDEX
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        valid = f"0..{vocab_size - 1}" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
        raise ValueError(f"{what}: token id {int(x[pos])} at position {pos} is out of range; "
                         f"valid ids are {valid} (vocab_size={vocab_size})")
