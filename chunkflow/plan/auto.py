"""Chunk settings for one device from the memory and cost models (``--chunking.auto``). Stdlib only.

A candidate is (chunk_size, K, recompute, activation checkpointing, offload). For each one and
each sample global batch of the run's data:

* memory: :func:`chunkflow.plan.memory.estimate_peak_memory`, static memory included, plus
  ``MODEL_MARGIN`` of its step part (the estimate's known errors are a few per cent either way,
  see that module); the candidate's peak is the largest over the sample batches and a batch of
  one sequence of the longest length the data allows (``max_length``), since the peak is set by
  the longest chain;
* time: the sum of the schedule's per-action seconds (:class:`chunkflow.plan.cost.CostModel` on
  one device: ``F``/``S``/``R`` a forward, a selective ``r`` one without attention, ``B`` a
  backward, plus one more forward of the decoder layers under activation checkpointing), and
  with offload the part of each action's host copies that its compute cannot hide (copies run
  on a side stream: an action costs the longer of the two). The mean over the sample batches.

Candidates within the budget are ranked by time, then by peak memory; the first is the choice.
Offload is a CUDA option only: on CPU the "host" is the same memory and it saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from chunkflow.plan.chunks import build_chunks, check_positive_int
from chunkflow.plan.cost import CostModel, GPUProfile, chunk_segments
from chunkflow.plan.memory import (
    OPTIMIZER_STATES,
    estimate_peak_memory,
    kept_attention_bytes_per_token,
    kv_state_bytes,
)
from chunkflow.plan.scheduling import ActionKind, schedule
from chunkflow.plan.units import format_bytes

MODEL_MARGIN = 0.05
"""Added to the estimated step memory (activations, state, kept outputs, transient)."""

CHUNK_SIZES = tuple(2**i for i in range(8, 17))  # 256 .. 64K
KS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Settings:
    chunk_size: int
    k: int
    recompute: str = "full"
    activation_checkpointing: bool = False
    offload: str = "none"

    def __str__(self) -> str:
        return (f"chunk_size={self.chunk_size} k={self.k} recompute={self.recompute} "
                f"activation_checkpointing={str(self.activation_checkpointing).lower()} "
                f"offload={self.offload}")


@dataclass(frozen=True)
class Choice:
    settings: Settings
    step_seconds: float
    """Predicted, mean over the sample batches (for ranking; see the module docstring)."""
    peak_bytes: int
    """Estimated device peak with the margin, static memory included."""
    host_bytes: int
    """What offload keeps in host memory at that peak."""


def candidate_settings(longest: int, *, offload: bool, chunk_sizes: Sequence[int] = CHUNK_SIZES,
                       ks: Sequence[int] = KS) -> list[Settings]:
    """Every distinct candidate for sequences of at most ``longest`` tokens: chunk sizes up to
    the first that holds ``longest`` whole, K up to the longest chain (larger K give the same
    schedule), selective recompute and offload only where a chain recomputes or holds state."""
    sizes = sorted(set(chunk_sizes))
    sizes = [c for c in sizes if c < longest] + [c for c in sizes if c >= longest][:1]
    out = []
    for chunk_size in sizes:
        chain = -(-longest // chunk_size)
        for k in sorted({min(k, chain) for k in ks}):
            recomputes = ("full", "selective") if k < chain else ("full",)
            offloads = ("none", "state", "all") if offload and chain > 1 else ("none",)
            for recompute in recomputes:
                for ac in (False, True):
                    for where in offloads:
                        if where == "all" and recompute != "selective":
                            continue
                        out.append(Settings(chunk_size, k, recompute, ac, where))
    return out


def choose_settings(model, batches: Sequence[Sequence[int]], *, memory_budget: int,
                    profile: GPUProfile, param_bytes: int = 4, activation_bytes: int | None = None,
                    optimizer: str = "adamw", max_length: int | None = None,
                    offload: bool = False, pack_chain_tails: bool = True,
                    chunk_sizes: Sequence[int] = CHUNK_SIZES, ks: Sequence[int] = KS,
                    varlen_state: bool = False,
                    trainable_params: int | None = None) -> list[Choice]:
    """Candidates whose estimated peak fits ``memory_budget`` bytes, fastest first.

    ``model``: a :class:`~chunkflow.plan.cost.ModelShape` (or anything with its fields and
    ``num_params``); ``batches``: sequence lengths of sample global batches; ``max_length``: the
    longest sequence the data may hold (default: the longest sampled); ``offload``: whether
    offload candidates are tried (CUDA); ``varlen_state``: chain states hold a chunk of rows
    past their prefix (the CUDA varlen kernel's layout), which an offloaded state's host
    memory holds too; ``trainable_params``: LoRA's trained parameters (``None``: all, a full
    fine-tune). Raises ``ValueError`` naming the smallest peak found
    when nothing fits.
    """
    memory_budget = check_positive_int("memory_budget", memory_budget)
    batches = [list(b) for b in batches if len(b)]
    if not batches:
        raise ValueError("choosing settings needs at least one non-empty batch of lengths")
    longest = max(max(b) for b in batches)
    if max_length is not None:
        longest = max(longest, check_positive_int("max_length", max_length))
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r}; valid: {', '.join(OPTIMIZER_STATES)}")
    activation_bytes = param_bytes if activation_bytes is None else activation_bytes
    cost = CostModel(model, profile, activation_bytes=activation_bytes)
    memory_batches = batches + [[longest]]
    plans: dict[tuple[int, int], object] = {}

    def plan(chunk_size: int, i: int):
        key = (chunk_size, i)
        if key not in plans:
            plans[key] = build_chunks(memory_batches[i], chunk_size=chunk_size,
                                      pack_chain_tails=pack_chain_tails)
        return plans[key]

    found, smallest = [], None
    for s in candidate_settings(longest, offload=offload, chunk_sizes=chunk_sizes, ks=ks):
        peak = host = 0
        for i in range(len(memory_batches)):
            est = estimate_peak_memory(model, plan(s.chunk_size, i), k=s.k,
                                       param_bytes=param_bytes,
                                       activation_bytes=activation_bytes, optimizer=optimizer,
                                       recompute=s.recompute, offload=s.offload,
                                       activation_checkpointing=s.activation_checkpointing,
                                       state_extra_rows=s.chunk_size if varlen_state else 0,
                                       trainable_params=trainable_params)
            with_margin = est.total + round(MODEL_MARGIN * (est.step + est.transient))
            if with_margin > peak:
                peak, host = with_margin, est.host
        if smallest is None or peak < smallest.peak_bytes:
            smallest = Choice(s, 0.0, peak, host)
        if peak > memory_budget:
            continue
        seconds = sum(step_seconds(cost, plan(s.chunk_size, i), s)
                      for i in range(len(batches))) / len(batches)
        found.append(Choice(s, seconds, peak, host))
    if not found:
        raise ValueError(f"no chunk settings fit a memory budget of "
                         f"{format_bytes(memory_budget)}: the "
                         f"smallest estimated peak is {format_bytes(smallest.peak_bytes)} "
                         f"({smallest.settings}); raise the budget, shorten --data.max_length "
                         f"or use a smaller model")
    # faster first; at equal time the simpler setting (offload, whose copies are priced as
    # hidden, and checkpointing only where they buy time), then less memory
    return sorted(found, key=lambda c: (round(c.step_seconds, 9), c.settings.offload != "none",
                                        c.settings.activation_checkpointing, c.peak_bytes))


def step_seconds(cost: CostModel, plan, s: Settings) -> float:
    """Predicted seconds of one step of ``plan`` under settings ``s`` (module docstring)."""
    shape, b = cost.shape, cost.activation_bytes
    total = 0.0
    for action in schedule(plan, k=s.k, recompute=s.recompute):
        chunk = plan.chunks[action.chunk_id]
        lens, prefix = chunk_segments(chunk)
        if action.kind is ActionKind.BACKWARD:
            seconds = cost.backward_seconds(lens, prefix_len=prefix)
            if s.activation_checkpointing:
                seconds += cost.activation_checkpointing_seconds(lens, prefix_len=prefix)
        else:
            seconds = cost.recompute_seconds(lens, prefix_len=prefix,
                                             selective=action.selective
                                             and action.kind is ActionKind.RECOMPUTE)
        if s.offload != "none" and chunk.is_dependent:
            moved = kv_state_bytes(shape, prefix, activation_bytes=b) * (
                1.0 if action.kind is ActionKind.BACKWARD else b / (b + max(b, 4)))
            if s.offload == "all" and action.selective:
                moved += chunk.num_tokens * kept_attention_bytes_per_token(
                    shape, activation_bytes=b)
            seconds = max(seconds, moved / cost.gpu.host_bytes_per_s)
        total += seconds
    return total


def format_choices(choices: Sequence[Choice], *, top: int = 5) -> str:
    """The choice and its runners-up as a table (time relative to the choice)."""
    if not choices:
        return "no candidate fits the memory budget"
    best = choices[0].step_seconds
    rows = [f"  {'chunk':>6} {'K':>3} {'recompute':>9} {'ckpt':>4} {'offload':>7} "
            f"{'step (model)':>12} {'vs best':>7} {'peak':>10} {'host':>10}"]
    for i, c in enumerate(choices[:top]):
        s = c.settings
        rows.append(f"{'*' if i == 0 else ' '} {s.chunk_size:>6} {s.k:>3} {s.recompute:>9} "
                    f"{'yes' if s.activation_checkpointing else 'no':>4} {s.offload:>7} "
                    f"{c.step_seconds:>11.3f}s {c.step_seconds / best:>6.2f}x "
                    f"{format_bytes(c.peak_bytes):>10} "
                    f"{format_bytes(c.host_bytes) if c.host_bytes else '-':>10}")
    if len(choices) > top:
        rows.append(f"  ... {len(choices) - top} more within the budget")
    return "\n".join(rows)

