"""The chunking options of a run, as one frozen value.

Built once (by the trainer from ``--chunking.*``, by a user in Python) and handed to
:class:`chunkflow.runtime.ChunkFlowEngine` and :class:`chunkflow.parallel.ParallelEngine`
unchanged, so the options are spelled out and validated in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from chunkflow.plan.chunks import check_positive_int
from chunkflow.plan.memory import OFFLOAD_MODES
from chunkflow.plan.scheduling import check_recompute
from chunkflow.runtime.attention import ATTENTION_BACKENDS
from chunkflow.runtime.head_loss import LOGITS_BUDGET
from chunkflow.runtime.loss import LOSS_NORMALIZATIONS


@dataclass(frozen=True)
class ChunkingOptions:
    """How a global batch is cut into chunks and trained chunk by chunk."""

    chunk_size: int
    """Most tokens per chunk."""
    k: int = 1
    """Chunks of a chain that keep their activations; the rest are recomputed."""
    loss_normalization: str = "token"
    """"token" (mean over the batch's supervised tokens) or "sequence" (mean of sequence means)."""
    pack_chain_tails: bool = True
    """Also pack short sequences into chains' last chunks."""
    attention_backend: Any = "auto"
    """"auto", "cpu-flash", "varlen", "math" or a kernel object
    (:mod:`chunkflow.runtime.attention.select`)."""
    activation_checkpointing: bool = False
    """Keep only each decoder layer's input inside a chunk; recompute the rest in its backward."""
    logits_budget: int = LOGITS_BUDGET
    """Bytes of logits a chunk's loss may hold at once; larger ones use a fused linear
    cross-entropy (:mod:`chunkflow.runtime.head_loss`)."""
    recompute: str = "full"
    """"full" (a chain's ``R`` runs the chunk's whole forward again) or "selective" (its ``S``
    keeps each layer's attention output and LSE; ``R`` runs all but the attention kernel)."""
    offload: str = "none"
    """"none", "state" (chain KV state in host memory, a layer at a time on the device) or
    "all" (also the attention outputs selective recompute keeps)."""
    compile: bool = False
    """Run each decoder layer compiled (``torch.compile``, one graph per layer kind; the chunk
    attention a custom op: :mod:`chunkflow.runtime.compiled`)."""

    def __post_init__(self):
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_int("k", self.k)
        check_recompute(self.recompute)
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload={self.offload!r}; valid: {', '.join(OFFLOAD_MODES)}")
        if self.offload == "all" and self.recompute != "selective":
            raise ValueError("offload='all' also moves the attention outputs that selective "
                             "recompute keeps, and recompute='full' keeps none; valid: "
                             "offload='state', or recompute='selective'")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization={self.loss_normalization!r}; valid: "
                             f"{', '.join(LOSS_NORMALIZATIONS)}")
        if isinstance(self.attention_backend, str) and \
                self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}; valid: "
                             f"{', '.join(ATTENTION_BACKENDS)}, or a kernel object")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
