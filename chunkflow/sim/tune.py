"""Predict a training iteration, Megatron-LM or chunkflow, and search the settings. Stdlib only.

An iteration is one global batch: per data-parallel replica, the pipeline schedule of its share
(``chunkflow.plan.pipeline``) run by the simulator (``chunkflow.sim``) with per-action seconds
from :class:`~chunkflow.plan.cost.CostModel`; the iteration ends with the slowest replica plus the
gradient reduction. Peak memory is the simulator's per-stage peak of retained graphs and KV state
plus the static memory, the largest over stages and replicas.

* Megatron-LM as the paper ran it: micro-batch 1, one sequence per micro-batch at its own length
  (no padding, no packing), plain 1F1B; replica r takes sequences r, r+dp, ... (Megatron's
  sampler). Under ``full`` recompute a backward briefly holds one recomputed layer more; that
  transient is added to the stage's peak (an upper bound: as if it coincided with the peak).
* chunkflow: sequences are balanced over replicas (longest serial time first, to the least
  loaded replica), each replica's share is chunked with ``build_chunks`` and run with
  state-aware 1F1B; a chunk's KV state is held from its forward until its backward; the
  gradients exist from a stage's first backward on; the optimizer step (static memory and
  AdamW's temporaries) may be a stage's peak.

:func:`autotune` searches chunk size, K and the <TP, PP, DP> layouts of a GPU count for the
fastest predicted iteration within a memory budget.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Sequence

from chunkflow.plan.balance import balance_chunks, subplan
from chunkflow.plan.chunks import ChunkPlan, build_chunks, check_positive_int
from chunkflow.plan.cost import GPUS_PER_NODE, CostModel, GPUProfile, ModelShape, chunk_segments
from chunkflow.plan.lengths import sample_lengths
from chunkflow.plan.pipeline import one_f_one_b
from chunkflow.plan.zero_bubble import pipeline_schedule
from chunkflow.plan.scheduling import ActionKind
from chunkflow.plan.units import format_size
from chunkflow.sim.simulator import simulate

CHUNK_SIZES = (2048, 4096, 8192, 16384, 32768)
KS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Prediction:
    iteration_seconds: float
    peak_memory_bytes: float
    """Largest over stages and replicas, static memory included."""
    stage_peak_bytes: tuple[float, ...]
    """Per stage, largest over replicas."""
    bubble_ratio: float
    """Of the slowest replica."""
    stage_busy_seconds: tuple[float, ...]
    """Per stage of the slowest replica: the makespan without any bubble is their maximum."""
    num_microbatches: int
    """Micro-batches (Megatron) or chunks (chunkflow) over all replicas."""
    idle_replicas: float = 0.0
    """The share of data-parallel replicas without any work in the batch."""


def _durations(cost: CostModel, items: dict[int, tuple[list[int], int]]):
    """``duration(stage, action)`` of the chunks in ``items`` (id -> segment lengths, prefix)
    under ``cost``: every action kind, ``I``/``W`` of the zero-bubble schedules included."""
    seconds = {}
    for s in range(cost.pp):
        for cid, (lens, prefix) in items.items():
            kw = dict(prefix_len=prefix, stage_idx=s)
            seconds[s, cid] = {
                ActionKind.FORWARD: cost.forward_seconds(lens, **kw),
                ActionKind.BACKWARD: cost.backward_seconds(lens, **kw),
                ActionKind.INPUT_BACKWARD: cost.input_backward_seconds(lens, **kw),
                ActionKind.WEIGHT_BACKWARD: cost.weight_backward_seconds(lens, **kw),
                "selective": cost.recompute_seconds(lens, selective=True, **kw)}

    def duration(s: int, a) -> float:
        by_kind = seconds[s, a.chunk_id]
        if a.kind is ActionKind.RECOMPUTE and a.selective:
            return by_kind["selective"]
        return by_kind.get(a.kind, by_kind[ActionKind.FORWARD])  # S, R: a forward

    return duration


def _simulate(cost: CostModel, stages, items: dict[int, tuple[list[int], int]],
              state_tokens: dict[int, int] | None = None, *, chunkflow: bool = False):
    """Simulate ``stages`` whose chunk ids map to (segment lengths, prefix) in ``items``.
    ``chunkflow``: chunkflow's runtime, whose gradients exist from the first backward on (not
    from the start: Megatron's gradient buffer), whose head keeps no log-probabilities where
    it fuses the cross-entropy, and whose optimizer step may peak."""

    duration = _durations(cost, items)
    tokens = {cid: sum(lens) for cid, (lens, _) in items.items()}
    # megatron's micro-batches keep their log-probabilities; chunkflow's head fuses large ones
    per_token = {(s, n): cost.activation_bytes_per_token(s, n if chunkflow else None)
                 for s in range(cost.pp) for n in set(tokens.values())}
    state_tokens = state_tokens or {}
    result = simulate(
        stages, duration=duration,
        p2p=cost.p2p_seconds(sum(tokens.values()) / len(tokens)),
        graph_bytes=lambda s, c: tokens[c] * per_token[s, tokens[c]],
        state_bytes=lambda s, c: (cost.kv_state_bytes(state_tokens[c], s)
                                  if c in state_tokens else 0.0),
        kept_bytes=lambda s, c: cost.kept_attention_bytes(tokens[c], s),
        grad_bytes=cost.grad_bytes if chunkflow else None)
    transient = [cost.backward_transient_bytes(max(tokens.values()), s) for s in range(cost.pp)]
    static = [cost.static_bytes(s) - (cost.grad_bytes(s) if chunkflow else 0)
              for s in range(cost.pp)]
    peaks = [static[s] + result.peak_memory[s] + transient[s] for s in range(cost.pp)]
    if chunkflow:  # chunkflow: the optimizer step's temporaries may peak higher
        peaks = [max(peak, cost.static_bytes(s) + cost.optimizer_step_bytes(s))
                 for s, peak in enumerate(peaks)]
    return result, peaks


def _combine(cost: CostModel, runs: list, num_microbatches: int) -> Prediction:
    slowest = max(runs, key=lambda r: r[0].makespan)[0]
    sync = max(cost.grad_sync_seconds(s) for s in range(cost.pp))
    stage_peaks = tuple(max(r[1][s] for r in runs) for s in range(cost.pp))
    return Prediction(iteration_seconds=slowest.makespan + sync,
                      peak_memory_bytes=max(stage_peaks), stage_peak_bytes=stage_peaks,
                      bubble_ratio=slowest.bubble_ratio,
                      stage_busy_seconds=tuple(slowest.busy), num_microbatches=num_microbatches)


def predict_megatron(cost: CostModel, seq_lens: Sequence[int]) -> Prediction:
    """Megatron-LM: one sequence per micro-batch, 1F1B, ``cost.recompute`` layer recompute."""
    if len(seq_lens) < cost.dp:
        raise ValueError(f"{len(seq_lens)} sequences cannot feed dp={cost.dp} replicas")
    runs = []
    for r in range(cost.dp):
        lens = list(seq_lens[r::cost.dp])
        items = {i: ([n], 0) for i, n in enumerate(lens)}
        runs.append(_simulate(cost, one_f_one_b(len(lens), cost.pp), items))
    return _combine(cost, runs, len(seq_lens))


def split_sequences(cost: CostModel, seq_lens: Sequence[int]) -> list[list[int]]:
    """Sequences per replica, each share in batch order: longest serial time first, each to the
    least loaded replica (LPT). One replica keeps the batch as it is."""
    if cost.dp == 1:
        return [list(seq_lens)]
    serial = [cost.forward_seconds([n]) + cost.backward_seconds([n]) for n in seq_lens]
    loads, owner = [0.0] * cost.dp, {}
    for i in sorted(range(len(seq_lens)), key=lambda i: -serial[i]):
        r = min(range(cost.dp), key=lambda r: (loads[r], r))
        loads[r] += serial[i]
        owner[i] = r
    return [[n for i, n in enumerate(seq_lens) if owner[i] == r] for r in range(cost.dp)]


def plan_items(plan: ChunkPlan) -> tuple[dict[int, tuple[list[int], int]], dict[int, int]]:
    """Per chunk (segment lengths, prefix); per chain chunk but the last, its own state tokens."""
    items = {c.chunk_id: chunk_segments(c) for c in plan.chunks}
    state = {c.chunk_id: c.segments[0].num_tokens for c in plan.chunks
             if c.is_dependent and c.chain_idx < plan.chain_of(c).num_chunks - 1}
    return items, state


def predict_chunkflow(cost: CostModel, seq_lens: Sequence[int], *, chunk_size: int, k: int,
                      recompute: str = "full", shard: str = "sequences",
                      schedule: str = "1f1b") -> Prediction:
    """chunkflow: chunks of ``chunk_size``, state-aware 1F1B keeping ``k`` graphs per chain
    (``schedule``: or a zero-bubble one, :mod:`chunkflow.plan.zero_bubble`);
    ``recompute``: how the other chunks are recomputed ("full" or "selective"). The cost
    model's ``recompute="full"`` (each layer keeps its input, one is recomputed in backward)
    is chunkflow's ``--chunking.activation_checkpointing``. ``shard``: how the batch is split
    over the data-parallel replicas: ``"sequences"`` balanced before chunking (the paper's
    analysis), ``"units"`` as chunkflow's runtime does it, chunking the whole batch and
    placing whole chains and standalone chunks (:func:`chunkflow.plan.balance_chunks`), so a
    batch of a few short sequences may leave replicas without a chunk
    (``Prediction.idle_replicas``)."""
    if shard not in ("sequences", "units"):
        raise ValueError(f"shard={shard!r}; valid: 'sequences', 'units'")
    if cost.recompute == "selective":
        raise ValueError("recompute='selective' (Megatron's core-attention recompute): chunkflow "
                         "recomputes through its S/R actions (k) and, with "
                         "--chunking.activation_checkpointing, whole layers: run its cost "
                         "model with recompute='none' or 'full'")
    if shard == "units":
        whole = build_chunks(seq_lens, chunk_size=chunk_size)
        ids = balance_chunks(whole, cost.dp, k=k, shape=cost.shape).chunk_ids
        plans = [subplan(whole, r)[0] if r else None for r in ids]
    else:
        plans = [build_chunks(share, chunk_size=chunk_size) if share else None
                 for share in split_sequences(cost, seq_lens)]
    runs, num_chunks = [], 0
    for plan in plans:
        if plan is None:
            continue
        items, state = plan_items(plan)

        def fits(stages, items=items, state=state) -> bool:  # zb-h2 may use the device's memory
            _, peaks = _simulate(cost, stages, items, state, chunkflow=True)
            return max(peaks) <= cost.gpu.memory_bytes

        stages = pipeline_schedule(plan, cost.pp, k=k, recompute=recompute,
                                   schedule=schedule, duration=_durations(cost, items),
                                   fits=fits)
        runs.append(_simulate(cost, stages, items, state, chunkflow=True))
        num_chunks += plan.num_chunks
    pred = _combine(cost, runs, num_chunks)
    return dataclasses.replace(pred, idle_replicas=plans.count(None) / cost.dp)


# ---- auto-tuner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    chunk_size: int
    k: int
    tp: int
    pp: int
    dp: int
    iteration_seconds: float
    peak_memory_bytes: float
    bubble_ratio: float
    sp: int | None = None
    """Sequence-parallel degree: ``None`` means ``tp`` (Megatron's); 1 means none."""
    mostly_idle: bool = False
    """In most of the batches some data-parallel replica gets no chunk."""
    schedule: str = "1f1b"
    """The pipeline schedule (:mod:`chunkflow.plan.zero_bubble`)."""

    @property
    def layout(self) -> str:
        """Megatron's <TP, SP, PP> plus the data-parallel degree."""
        sp = self.tp if self.sp is None else self.sp
        return f"<TP {self.tp}, SP {sp}, PP {self.pp}> x DP {self.dp}"


def layouts(shape: ModelShape, num_gpus: int, *, max_tp: int = GPUS_PER_NODE,
            max_pp: int | None = None) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) with tp inside a node dividing the query and KV heads and the MLP width,
    pp dividing the layers (Megatron's rules), tp * pp * dp = num_gpus; ``max_tp``/``max_pp``
    restrict them (to what a runtime can run)."""
    num_gpus = check_positive_int("num_gpus", num_gpus)
    out = []
    for tp in (1, 2, 4, 8):
        if (tp > min(GPUS_PER_NODE, num_gpus, max_tp) or num_gpus % tp
                or shape.num_attention_heads % tp or shape.num_key_value_heads % tp
                or shape.intermediate_size % tp):
            continue
        for pp in range(1, min(num_gpus // tp, max_pp or num_gpus) + 1):
            if (num_gpus // tp) % pp == 0 and shape.num_hidden_layers % pp == 0:
                out.append((tp, pp, num_gpus // (tp * pp)))
    return out


RUNTIMES = {"megatron": {}, "chunkflow": {"gathered_inputs": True}}
"""How each runtime's tensor parallelism is priced (see :func:`autotune`)."""


def autotune(shape: ModelShape, gpu: GPUProfile, *, max_len: int, num_gpus: int,
             memory_budget: float, global_batch: int = 256, seed: int = 0,
             seq_lens: Sequence[int] | None = None,
             batches: Sequence[Sequence[int]] | None = None,
             chunk_sizes: Sequence[int] = CHUNK_SIZES, ks: Sequence[int] = KS,
             max_tp: int = GPUS_PER_NODE, max_pp: int | None = None,
             runtime: str = "megatron", cost_options: dict | None = None,
             schedules: Sequence[str] = ("1f1b",)) -> list[Candidate]:
    """Candidates within ``memory_budget`` bytes per GPU, fastest first.

    The workload: ``batches`` (several global batches, e.g. a run's own: a candidate's time is
    their mean, its peak their maximum), or one batch ``seq_lens``, or ``global_batch`` lengths
    from the long-tailed generator (``chunkflow.plan.lengths``) scaled to ``max_len``,
    deterministic in ``seed``. Chunk sizes above ``max_len`` are skipped; K values beyond the
    longest chain give the same schedule and are tried once; ``max_tp``/``max_pp`` limit the
    layouts (see :func:`layouts`). ``runtime``: "megatron" prices Megatron's tensor parallelism
    (sequence parallel, vocabulary-parallel head), "chunkflow" this runtime's (the same, with
    the attention and MLP inputs kept gathered for their backward); ``cost_options``: more
    :class:`~chunkflow.plan.cost.CostModel` fields over the runtime's (e.g. ``sp=1`` for a run
    without sequence parallelism, ``vocab_parallel=False`` for a replicated embedding and head,
    ``distributed_optimizer=False`` for DDP); ``schedules``: the pipeline schedules to try
    on layouts with pipeline stages (a zero-bubble one runs with DDP, so its replicas are
    priced without a sharded optimizer). Raises
    ``ValueError`` when nothing fits, naming the smallest peak found.
    """
    max_len = check_positive_int("max_len", max_len)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; valid: {', '.join(RUNTIMES)}")
    if batches is None:
        if seq_lens is None:
            seq_lens = sample_lengths(random.Random(seed), check_positive_int(
                "global_batch", global_batch), max_len=max_len)
        batches = [seq_lens]
    batches = [list(b) for b in batches]
    shard = "units" if runtime == "chunkflow" else "sequences"  # as that runtime shards
    if not batches or not all(batches):
        raise ValueError("autotune needs at least one non-empty batch of sequence lengths")
    found, smallest = [], None
    pipelined = []  # (lower bound of any schedule's iteration, cost, chunk_size, k)

    def evaluate(cost: CostModel, chunk_size: int, k: int, schedule: str):
        nonlocal smallest
        priced = cost if schedule == "1f1b" or cost.dp == 1 else dataclasses.replace(
            cost, distributed_optimizer=False)  # a zero-bubble schedule runs with DDP
        preds = [predict_chunkflow(priced, b, chunk_size=chunk_size, k=k, shard=shard,
                                   schedule=schedule) for b in batches]
        idle = sum(p.idle_replicas > 0 for p in preds)
        cand = Candidate(chunk_size, k, cost.tp, cost.pp, cost.dp,
                         sum(p.iteration_seconds for p in preds) / len(preds),
                         max(p.peak_memory_bytes for p in preds),
                         sum(p.bubble_ratio for p in preds) / len(preds), cost.sp,
                         mostly_idle=idle > len(preds) / 2, schedule=schedule)
        if smallest is None or cand.peak_memory_bytes < smallest.peak_memory_bytes:
            smallest = cand
        if cand.peak_memory_bytes <= memory_budget:
            found.append(cand)
        return cand, preds

    for tp, pp, dp in layouts(shape, num_gpus, max_tp=max_tp, max_pp=max_pp):
        if dp > min(len(b) for b in batches):
            continue
        cost = CostModel(shape, gpu, tp=tp, pp=pp, dp=dp,
                         **{**RUNTIMES[runtime], **(cost_options or {})})
        for chunk_size in sorted(c for c in chunk_sizes if c <= max_len) or [min(chunk_sizes)]:
            longest = max(-(-n // chunk_size) for b in batches for n in b)
            for k in sorted({min(k, longest) for k in ks}):
                cand, preds = evaluate(cost, chunk_size, k, "1f1b")
                if pp > 1 and cand.peak_memory_bytes <= memory_budget:
                    # no schedule runs the iteration faster than its busiest stage computes
                    # (plus the gradient sync, as _combine adds it)
                    sync = max(cost.grad_sync_seconds(s) for s in range(cost.pp))
                    bound = sync + sum(max(p.stage_busy_seconds) for p in preds) / len(preds)
                    pipelined.append((bound, cost, chunk_size, k))
    # The zero-bubble schedules (slower to build) only where they could win: by the lower bound,
    # while it is below the fastest iteration found (they hold at least 1F1B's memory).
    others = [s for s in schedules if s != "1f1b"]
    for bound, cost, chunk_size, k in sorted(pipelined, key=lambda x: x[0]) if others else ():
        best = min((c.iteration_seconds for c in found if not c.mostly_idle), default=None)
        if best is not None and bound >= best:
            break
        for schedule in others:
            evaluate(cost, chunk_size, k, schedule)
    if not found:
        if smallest is None:
            raise ValueError(f"no <TP, PP, DP> layout of {num_gpus} GPUs suits this model "
                             f"(TP must divide the heads, PP the {shape.num_hidden_layers} layers; "
                             f"DP at most the {min(len(b) for b in batches)} sequences of a batch)")
        raise ValueError(f"nothing fits in {format_size(memory_budget)} per GPU: the smallest "
                         f"predicted peak is {format_size(smallest.peak_memory_bytes)} "
                         f"(chunk {format_size(smallest.chunk_size, tokens=True)}, K={smallest.k}, "
                         f"{smallest.layout}); add GPUs or raise the budget")
    # a layout whose replicas sit idle in most batches wastes GPUs another layout would use:
    # only when nothing else fits
    return sorted(found, key=lambda c: (c.mostly_idle, c.iteration_seconds,
                                        c.peak_memory_bytes))


def format_candidates(cands: Sequence[Candidate], top: int = 5) -> str:
    """The best ``top`` candidates as a table, the first one marked as the choice."""
    if not cands:
        return "no candidate fits the memory budget"
    rows = [f"{'':2}{'chunk':>6} {'K':>3}  {'layout':<28} {'schedule':<8} {'iteration':>10} "
            f"{'peak mem':>10} {'bubbles':>8}"]
    for i, c in enumerate(cands[:top]):
        rows.append(f"{'*' if i == 0 else ' ':2}{format_size(c.chunk_size, tokens=True):>6} "
                    f"{c.k:>3}  {c.layout:<28} {c.schedule:<8} "
                    f"{_fmt_seconds(c.iteration_seconds):>10} "
                    f"{format_size(c.peak_memory_bytes):>10} {c.bubble_ratio:>8.1%}")
    if len(cands) > top:
        rows.append(f"  ... {len(cands) - top} more within the budget")
    return "\n".join(rows)


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds >= 0.1 else f"{seconds * 1e3:.2f}ms"
