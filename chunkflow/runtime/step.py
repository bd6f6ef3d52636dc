"""What one step of the engine holds and returns.

* :class:`StepResult` / :class:`EvalResult`: a training step's and an evaluation's figures;
* :class:`StepState`: one step as its actions see it: the batch's per-sequence tensors, the
  peers, and what the schedule carries from one action to a later one (chain states, graphs,
  stage inputs, kept attention outputs), all empty again when the step ends;
* :class:`ChunkGraph`: what a chunk's ``B`` needs from its ``F``/``R``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from chunkflow.plan import ChunkPlan
from chunkflow.runtime.attention import KeptAttention
from chunkflow.runtime.kv_state import ChainState
from chunkflow.runtime.split_backward import WeightWork
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


@dataclass
class ChunkGraph:
    """What a chunk's backward needs: its loss (0-dim) or output hidden states, and the input
    received from the previous stage."""

    output: torch.Tensor
    input: torch.Tensor | None
    embedded: torch.Tensor | None = None
    """First stage under a split backward: the embedding's output (``input`` is its leaf)."""
    attention: object | None = None
    """Compiled layers: the chunk's attention, which their backward finds by its handle."""


@dataclass
class StepState:
    """One step as its actions see it: the batch's per-sequence tensors, the peers, and what
    the schedule carries from one action to another (all empty again at the end)."""

    plan: ChunkPlan
    ids: list[torch.Tensor]
    targets: list[torch.Tensor]
    weights: list[torch.Tensor]
    kernel: object
    kernel_device: torch.device
    io: StageIO
    sync: GradSync
    training: bool
    """A training step (graphs kept for ``B``); else forward-only (evaluation)."""
    total: torch.Tensor
    """The step's loss so far (on the last stage)."""
    dropout_seed: int | None = None
    """Seed of this step's dropout masks (one generator per chunk); None: no active dropout."""
    chunk_ids: Sequence[int] | None = None
    """Each chunk's id in the global batch (for its dropout seed); None: the plan's own."""
    cast_cache: dict = field(default_factory=dict)
    """The head weight's autocast copy, shared by the step's chunks (see head_loss)."""
    last_backward: int | None = None
    """Index of the step's last ``B`` (its backward runs the data-parallel sync)."""
    states: dict[int, ChainState] = field(default_factory=dict)
    """Chain id -> its key/value state, from the chain's first action to its last."""
    graphs: dict[int, "ChunkGraph"] = field(default_factory=dict)
    """Chunk id -> its graph, from its ``F``/``R`` to its ``B`` (or ``I``)."""
    split: set[int] = field(default_factory=set)
    """Chunks whose backward is split (``I`` then ``W``, a zero-bubble schedule's)."""
    weight_work: dict[int, WeightWork] = field(default_factory=dict)
    """Chunk id -> what its ``W`` needs, from its ``I`` on (it keeps the graph alive)."""
    stage_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    """Chunk id -> the input an ``S`` received, for its ``R``."""
    kept: dict[int, KeptAttention] = field(default_factory=dict)
    """Chunk id -> the attention outputs an ``s`` kept, for its ``r``."""
