"""Vocabulary-parallel embedding, output head and loss over the "tp" group (Megatron's split).

Without it, the embedding and head weights (V x E each, 1.2B parameters apiece for Qwen2.5-72B)
stay whole on every tensor-parallel rank, with their gradients and AdamW state. With it:

* the embedding (:class:`VocabParallelEmbedding`): each rank holds ``V / tp`` rows, looks up
  the chunk's ids that fall in them, and the partial embeddings are summed over the group,
  reduce-scattered to each rank's rows under sequence parallelism. (Not ``RowwiseParallel`` on
  the ``nn.Embedding``: DTensor's embedding backward computes the weight's gradient whole on
  every rank, V x E per chunk, and keeps it replicated.)
* the head's weight is split the same way (``ColwiseParallel``; a tied head is the embedding's
  weight, split once), and :func:`vocab_parallel_head_loss` computes the chunk's loss without
  any rank holding a full-vocabulary logit: each rank takes its ``V / tp`` logits of every row
  (the chunk's hidden states are all-gathered first under sequence parallelism), and the
  log-sum-exp and the target logit are combined over the group (an all-reduce of one float per
  row each: the max, the sum of exponentials, the target's logit). Rows are taken in blocks of at
  most ``logits_budget`` bytes of logits, as :mod:`chunkflow.runtime.head_loss` does on one
  process, and the backward recomputes each block's logits, so no (L x V / tp) tensor is kept.

Each rank then holds the whole chunk's loss (the same on every rank of the group).

Shape legend: L rows of the chunk (padded under sequence parallelism), E hidden size, V
vocabulary, Vr = V / tp this rank's part of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from chunkflow.models.adapter import adapt
from chunkflow.parallel.mesh import ParallelContext
from chunkflow.runtime.head_loss import LOGITS_BUDGET, _add_matmul, _logits, _low
from chunkflow.runtime.loss import IGNORE_INDEX


def vocab_rows(vocab_size: int, tp: int, tp_rank: int) -> range:
    """The vocabulary rows rank ``tp_rank`` holds: DTensor's ``Shard(0)``, ``torch.chunk``'s
    split (ceil(V / tp) each, the last ones fewer when tp does not divide V)."""
    size = -(-vocab_size // tp)
    return range(min(tp_rank * size, vocab_size), min((tp_rank + 1) * size, vocab_size))


def _adapt(model: nn.Module):
    return adapt(model, what="--parallel.vocab_parallel", valid="--parallel.vocab_parallel=false")


def embedding_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The stage's embedding and output head (None where another stage holds them)."""
    adapter = _adapt(model)
    return adapter.embedding(), adapter.head()


def check_vocab_parallel(model: nn.Module, tp: int) -> None:
    """Refuse, with the reason, a vocabulary or head the split does not fit."""
    vocab = model.config.vocab_size
    if not vocab_rows(vocab, tp, tp - 1):
        raise ValueError(f"--parallel.vocab_parallel with tp={tp} leaves the last rank no row "
                         f"of the model's vocab_size={vocab}; valid: --parallel.vocab_parallel="
                         f"false")
    head = _adapt(model).head()
    if head is not None and (not isinstance(head, nn.Linear) or head.bias is not None):
        raise ValueError(f"--parallel.vocab_parallel needs a bias-free linear output head, got "
                         f"{head}; valid: --parallel.vocab_parallel=false")


def apply_vocab_parallel(model: nn.Module, ctx: ParallelContext, *,
                         sequence_parallel: bool) -> None:
    """Split ``model``'s embedding and head weights over "tp" by vocabulary rows, in place."""
    check_vocab_parallel(model, ctx.tp)
    mesh = ctx.mesh["tp"]
    adapter = _adapt(model)
    embed, head = adapter.embedding(), adapter.head()
    tied = embed is not None and head is not None and head.weight is embed.weight
    if embed is not None:
        embed = VocabParallelEmbedding(embed, ctx, sequence_parallel=sequence_parallel)
        adapter.set_embedding(embed)
    if tied:
        head.weight = embed.weight  # the embedding's new, split parameter
    elif head is not None:
        # The head module is never called (the loss reads its weight); the style splits it.
        parallelize_module(head, mesh, ColwiseParallel())


class VocabParallelEmbedding(nn.Module):
    """An ``nn.Embedding`` whose weight is split by vocabulary rows over "tp" (``Shard(0)``):
    each rank looks up the ids in its rows (zeros elsewhere), and the partial embeddings are
    summed over the group: reduce-scattered to each rank's rows under sequence parallelism,
    all-reduced otherwise. Its weight keeps the name ``weight``, so parameter names stay the
    model's; ``padding_idx`` keeps its zero gradient, as in ``nn.Embedding``."""

    def __init__(self, embed: nn.Embedding, ctx: ParallelContext, *, sequence_parallel: bool):
        super().__init__()
        self.mesh = ctx.mesh["tp"]
        self.num_embeddings, self.embedding_dim = embed.num_embeddings, embed.embedding_dim
        self.padding_idx = embed.padding_idx
        self.rows = vocab_rows(embed.num_embeddings, ctx.tp, ctx.tp_rank)
        self.out_placement = Shard(1) if sequence_parallel else Replicate()
        self.weight = nn.Parameter(distribute_tensor(embed.weight.detach(), self.mesh, [Shard(0)]),
                                   requires_grad=embed.weight.requires_grad)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (B, L) ids, the whole chunk's -> (B, L / tp, E) this rank's rows (or (B, L, E))
        rows = self.rows
        local = input_ids - rows.start
        mine = (local >= 0) & (local < len(rows))
        pad = self.padding_idx
        pad = pad - rows.start if pad is not None and pad in rows else None
        out = F.embedding(local.clamp(0, len(rows) - 1), self.weight.to_local(), padding_idx=pad)
        out = out * mine[..., None].to(out.dtype)  # others' ids: zero, and no gradient here
        return DTensor.from_local(out, self.mesh, [Partial()], run_check=False).redistribute(
            self.mesh, [self.out_placement]).to_local()


def vocab_parallel_head_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                             weights: torch.Tensor, *, ctx: ParallelContext,
                             sequence_parallel: bool, logits_budget: int = LOGITS_BUDGET,
                             cast_cache: dict | None = None) -> torch.Tensor:
    """hidden (L / tp, E) this rank's rows (sequence parallel) or (L, E), targets (L,) with -100
    ignored, weights (L,) -> sum_t weight_t * CE_t over the whole chunk, with the head's weight
    split by vocabulary over ``ctx``'s "tp" group (see the module docstring)."""
    mesh = ctx.mesh["tp"]
    if sequence_parallel:  # (L / tp, E) -> (L, E); backward: the partial sums reduce-scattered
        hidden = DTensor.from_local(hidden, mesh, [Shard(0)], run_check=False).redistribute(
            mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    else:  # replicated rows; backward: each rank's part of their gradient, summed
        hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False).to_local(
            grad_placements=[Partial()])
    weight = head.weight
    local = weight.to_local() if isinstance(weight, DTensor) else weight  # (Vr, E)
    device = hidden.device.type
    low = local.detach()  # the rows the matmuls read
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)  # what autocast makes of a linear layer
        # the parameter, cast once per step (its local view is a new object on every call);
        # its gradient is accumulated and returned in its own dtype, not the matmuls'
        hidden, low = hidden.to(dtype), _low(weight, dtype, cast_cache)
        low = low.to_local() if isinstance(low, DTensor) else low
    acc = torch.promote_types(hidden.dtype, torch.float32)
    # blocks sized by the largest part of the vocabulary: the same on every rank, so that
    # their all-reduces match (the last ranks hold fewer rows when tp does not divide V)
    widest = len(vocab_rows(weight.shape[0], ctx.tp, 0))
    rows = max(1, logits_budget // (widest * acc.itemsize))
    with torch.autocast(device, enabled=False):
        start = vocab_rows(weight.shape[0], ctx.tp, ctx.tp_rank).start
        ce = _VocabParallelCrossEntropy.apply(hidden, local, low, targets, start, rows,
                                              ctx.tp_group)
    return (ce * weights.to(ce.dtype)).sum()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (0 at ignored targets) of ``hidden @ weight.T`` where ``weight``
    is this rank's vocabulary rows ``[start, start + Vr)``, ``rows`` tokens at a time; every rank
    returns the whole (L,) result. ``low``: ``weight`` detached, in the matmuls' dtype (its
    bf16 copy under autocast). Backward: this rank's part of the hidden states' gradient (a
    partial sum over the group) and its weight rows' whole gradient, accumulated over the
    blocks in float32 (or wider) and returned in the weight's dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, low, targets, start, rows, group):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        target_logit = torch.zeros_like(lse)
        local_t, mine = _local_targets(targets, start, weight.shape[0], acc)
        for a in range(0, hidden.shape[0], rows):
            logits = _logits(hidden[a:a + rows], low, None, acc)  # (rows, Vr)
            top = logits.max(-1).values
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            sum_exp = (logits - top[:, None]).exp().sum(-1)
            dist.all_reduce(sum_exp, group=group)
            lse[a:a + rows] = top + sum_exp.log()
            picked = logits.gather(1, local_t[a:a + rows, None])[:, 0] * mine[a:a + rows]
            target_logit[a:a + rows] = picked
        dist.all_reduce(target_logit, group=group)
        kept = targets != IGNORE_INDEX
        ctx.save_for_backward(hidden, low, targets, lse)
        ctx.start, ctx.rows, ctx.weight_dtype = start, rows, weight.dtype
        return (lse - target_logit) * kept

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, low, targets, lse = ctx.saved_tensors
        acc = lse.dtype
        local_t, mine = _local_targets(targets, ctx.start, low.shape[0], acc)
        g_out = grad_ce.to(acc) * (targets != IGNORE_INDEX)
        dh = torch.empty_like(hidden)
        dw = torch.zeros(low.shape, dtype=torch.promote_types(acc, ctx.weight_dtype),
                         device=low.device)
        for a in range(0, hidden.shape[0], ctx.rows):
            h = hidden[a:a + ctx.rows]
            logits = _logits(h, low, None, acc)
            g = (logits - lse[a:a + ctx.rows, None]).exp() * g_out[a:a + ctx.rows, None]
            g.scatter_add_(1, local_t[a:a + ctx.rows, None],
                           -(g_out[a:a + ctx.rows] * mine[a:a + ctx.rows])[:, None])
            g_in = g.to(hidden.dtype)
            dh[a:a + ctx.rows] = g_in @ low
            _add_matmul(dw, g.transpose(0, 1), g_in.transpose(0, 1), h)  # unrounded
        return dh, dw.to(ctx.weight_dtype), None, None, None, None, None


def _local_targets(targets: torch.Tensor, start: int, size: int, dtype: torch.dtype):
    """(targets shifted into this rank's vocabulary rows and clamped to them, and 1 where the
    target falls in them, else 0, in ``dtype``)."""
    local = targets - start
    mine = (local >= 0) & (local < size)
    return local.clamp(0, size - 1), mine.to(dtype)
