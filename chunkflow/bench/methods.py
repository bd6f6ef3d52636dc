"""The benchmarked training methods, each one forward + backward of a global batch.

* ``chunkflow``: :class:`~chunkflow.runtime.engine.ChunkFlowEngine` at (chunk_size, K).
* ``pad`` (Megatron-LM's usual SFT setting): every sequence padded to the batch's maximum length,
  ``micro_batch`` sequences per micro-batch, plain causal attention over the padded rows (the pad
  positions are computed, then masked out of the loss).
* ``packed`` (Megatron-LM with packed sequences, THD): sequences packed best-fit-decreasing into
  micro-batches of at most the maximum length, each attending only to itself (one causal
  attention per sequence, as flash-attn's varlen kernel does). Without recompute this is the
  ideal: unchunked, nothing recomputed, no padding.
* ``hf``: the same weights in transformers' ``LlamaForCausalLM`` (or Qwen2), fed as its Trainer
  feeds it with ``DataCollatorWithFlattening``: ``micro_batch`` examples flattened into one row with
  restarting ``position_ids``, loss normalised by ``num_items_in_batch``. With SDPA (no
  flash-attn varlen) transformers builds a dense (T x T) block-diagonal mask from the position
  ids, and SDPA computes every one of the T^2 query/key pairs.

``recompute``: full activation recompute (Megatron's ``--recompute-granularity full``, one
checkpoint per decoder layer) or, for ``hf``, transformers' activation (gradient) checkpointing.

Every method minimises the same loss, the token mean over the global batch's supervised tokens,
so their losses agree (a test checks it) and gradient accumulation over micro-batches adds up to
one global step.
"""

from __future__ import annotations

import time

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chunkflow.bench.options import MethodConfig
from chunkflow.bench.workload import count_tokens, forward
from chunkflow.models.hf_checkpoint import config_to_hf
from chunkflow.plan import build_chunks
from chunkflow.plan.cost import ModelShape, forward_flops
from chunkflow.runtime.engine import ChunkFlowEngine
from chunkflow.runtime.loss import IGNORE_INDEX, shift_labels, token_weights, weighted_cross_entropy


@dataclass
class StepStats:
    loss: float
    """Sum of the micro-batch losses run (the global batch's loss when all ran)."""
    micro_batches_run: int
    micro_batches: int
    executed_flops: float
    """FLOPs the method computes for the whole step: padding, recompute and masked pairs too."""


def build_runner(config: MethodConfig, model: torch.nn.Module, shape: ModelShape, *,
                 time_actions: bool = False):
    """The runner of ``config`` on the reference ``model`` (hf: on a transformers copy of it);
    ``time_actions``: chunkflow's per-action timing."""
    if config.method == "chunkflow":
        return ChunkFlowRunner(config, model, shape, time_actions=time_actions)
    if config.method == "hf":
        return HFRunner(config, model, shape)
    return DenseRunner(config, model, shape)


class ChunkFlowRunner:
    """chunkflow's engine. With ``time_actions``, ``action_seconds`` sums each action kind's time
    over the steps run (through the engine's action hook, which then synchronises a GPU after
    every action; ``s``/``r`` are the selective ``S``/``R``)."""

    def __init__(self, config: MethodConfig, model, shape: ModelShape, *,
                 time_actions: bool = False):
        self.model, self.shape, self.config = model, shape, config
        self.k, self.selective = config.k, config.selective
        self.engine = ChunkFlowEngine(model, chunk_size=config.chunk_size, k=config.k,
                                      recompute="selective" if config.selective else "full",
                                      activation_checkpointing=config.recompute)
        self.action_seconds: dict[str, float] = {}
        self._started = 0.0
        if time_actions:
            self.engine.register_action_hook(self._time_action)

    def _time_action(self, action, phase: str) -> None:
        if next(self.model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        kind = str(action).rstrip("0123456789")
        self.action_seconds[kind] = self.action_seconds.get(kind, 0.0) + now - self._started

    def parameters(self):
        return self.model.parameters()

    def step(self, batch, *, max_micro_batches: int | None = None) -> StepStats:
        result = self.engine.forward_backward(batch)
        plan, flops = result.plan, 0.0
        recomputed = {c for chain in plan.chains for c in chain.chunk_ids[:-self.k]}
        for chunk in plan.chunks:
            lens = [s.num_tokens for s in chunk.segments]
            prefix = chunk.segments[0].start if chunk.is_dependent else 0
            flops += 3 * forward(self.shape, lens, prefix_len=prefix)
            if chunk.chunk_id in recomputed:  # its S forward fills the state, R redoes it
                flops += forward(self.shape, lens, prefix_len=prefix, head=False)
                if self.selective:  # ... but for the attention kernel
                    flops -= forward_flops(self.shape, lens, prefix_len=prefix).attention
            if self.config.recompute:  # checkpointed layers run their forward once more
                flops += forward(self.shape, lens, prefix_len=prefix, head=False)
        return StepStats(float(result.loss), plan.num_chunks, plan.num_chunks, flops)


def _targets_and_weights(batch, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Shifted labels per sequence, and the global batch's token-mean weights (float32+)."""
    targets = [shift_labels(ex["labels"]) for ex in batch]
    weights, _ = token_weights(targets, "token", torch.promote_types(dtype, torch.float32))
    return targets, weights


class DenseRunner:
    """Megatron-LM-style training of the reference model: padded or packed micro-batches."""

    def __init__(self, config: MethodConfig, model, shape: ModelShape):
        self.config, self.model, self.shape = config, model, shape

    def parameters(self):
        return self.model.parameters()

    def micro_batches(self, lengths: Sequence[int]) -> list[list[tuple[int, int]]]:
        """Per micro-batch, its sequences as (sequence index, length)."""
        if self.config.method == "pad":
            m = self.config.micro_batch
            return [[(i, lengths[i]) for i in range(s, min(s + m, len(lengths)))]
                    for s in range(0, len(lengths), m)]
        plan = build_chunks(list(lengths), chunk_size=max(lengths))  # bins of the max length
        return [[(s.seq_id, s.num_tokens) for s in c.segments] for c in plan.chunks]

    def step(self, batch, *, max_micro_batches: int | None = None) -> StepStats:
        lengths = [len(ex["input_ids"]) for ex in batch]
        targets, weights = _targets_and_weights(batch, next(self.model.parameters()).dtype)
        groups = self.micro_batches(lengths)
        run = groups[:max_micro_batches] if max_micro_batches else groups
        loss = 0.0
        for group in run:
            loss += float(self._forward_backward(batch, targets, weights, group))
        return StepStats(loss, len(run), len(groups), sum(self._flops(g, max(lengths))
                                                           for g in groups))

    def _flops(self, group, max_len: int) -> float:
        lens = ([max_len] * len(group) if self.config.method == "pad"
                else [n for _, n in group])
        flops = 3 * forward(self.shape, lens)
        return flops + (forward(self.shape, lens, head=False) if self.config.recompute else 0.0)

    def _forward_backward(self, batch, targets, weights, group) -> torch.Tensor:
        device = next(self.model.parameters()).device
        seqs = [i for i, _ in group]
        if self.config.method == "pad":
            width = max(len(ex["input_ids"]) for ex in batch)

            def padded(tensors, value):  # (n,) each -> (m, width), right-padded
                out = torch.full((len(seqs), width), value, dtype=tensors[0].dtype)
                for row, i in enumerate(seqs):
                    out[row, : len(tensors[i])] = tensors[i]
                return out.to(device)

            ids = padded([ex["input_ids"] for ex in batch], 0)
            tgt, w = padded(targets, IGNORE_INDEX), padded(weights, 0.0)
            position_ids = torch.arange(width, device=device).expand(len(seqs), width)
            attention = None  # plain causal attention over each padded row
        else:
            ids = torch.cat([batch[i]["input_ids"] for i in seqs])[None].to(device)
            tgt = torch.cat([targets[i] for i in seqs])[None].to(device)
            w = torch.cat([weights[i] for i in seqs])[None].to(device)
            position_ids = torch.cat([torch.arange(n, device=device) for _, n in group])[None]
            attention = _VarlenAttention([n for _, n in group])
        hidden = self._hidden_states(ids, position_ids, attention)
        logits = self.model.lm_head(hidden)
        loss = weighted_cross_entropy(logits.flatten(0, 1), tgt.flatten(), w.flatten())
        loss.backward()
        return loss.detach()

    def _hidden_states(self, ids, position_ids, attention) -> torch.Tensor:
        """The reference model's ``hidden_states``, with one checkpoint per layer on recompute."""
        body = self.model.model
        x = body.embed_tokens(ids)
        cos, sin = body.rotary_emb(position_ids, x.dtype)
        for layer in body.layers.values():
            if self.config.recompute:
                x = checkpoint(layer, x, cos, sin, attention, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention)
        return body.norm(x)


class _VarlenAttention:
    """Causal attention restricted to each packed sequence (flash-attn varlen's semantics)."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths

    def __call__(self, layer_idx, q, k, v):
        # q (1, H, T, D), k/v (1, G, T, D): one causal SDPA per sequence's slice of T
        outs, start = [], 0
        for n in self.lengths:
            sl = slice(start, start + n)
            outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl],
                                                       is_causal=True, enable_gqa=True))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class HFRunner:
    """The same weights in transformers, trained on DataCollatorWithFlattening micro-batches."""

    def __init__(self, config: MethodConfig, model, shape: ModelShape):
        import transformers

        fields = config_to_hf(model.config, dtype="float32")
        hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields,
                                                      use_cache=False)
        param = next(model.parameters())
        self.model = transformers.AutoModelForCausalLM.from_config(
            hf_config, attn_implementation="sdpa").to(param.device, param.dtype)
        self.model.load_state_dict(model.state_dict())
        self.model.train()
        if config.recompute:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.config, self.shape = config, shape
        self.collator = transformers.DataCollatorWithFlattening(return_position_ids=True)

    def parameters(self):
        return self.model.parameters()

    def step(self, batch, *, max_micro_batches: int | None = None) -> StepStats:
        device = next(self.model.parameters()).device
        num_items = count_tokens(batch)[1]
        m = self.config.micro_batch
        groups = [batch[s:s + m] for s in range(0, len(batch), m)]
        run = groups[:max_micro_batches] if max_micro_batches else groups
        loss = 0.0
        for group in run:
            inputs = self.collator([{"input_ids": ex["input_ids"].tolist(),
                                     "labels": ex["labels"].tolist()} for ex in group],
                                   return_tensors="pt")
            out = self.model(**{k: v.to(device) for k, v in inputs.items()},
                             num_items_in_batch=num_items)
            out.loss.backward()
            loss += float(out.loss.detach())
        flops = 0.0
        for group in groups:
            lens = [len(ex["input_ids"]) for ex in group]
            flops += 3 * forward(self.shape, lens, dense_attention=True)
            if self.config.recompute:
                flops += forward(self.shape, lens, head=False, dense_attention=True)
        return StepStats(loss, len(run), len(groups), flops)
