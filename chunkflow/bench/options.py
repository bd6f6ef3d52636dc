"""What ``chunkflow bench`` measures: the sweep's options and one method configuration.

Stdlib only, so the command line can build its parser without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkflow.plan.chunks import check_positive_int

METHODS = ("chunkflow", "pad", "packed", "hf")


@dataclass(frozen=True)
class MethodConfig:
    method: str
    chunk_size: int | None = None
    """chunkflow: tokens per chunk."""
    k: int | None = None
    """chunkflow: chunks of a chain that keep their activations."""
    micro_batch: int = 1
    """pad and hf: sequences per micro-batch (packed micro-batches hold up to the max length)."""
    recompute: bool = False
    """pad and packed: full activation recompute; hf: gradient checkpointing; chunkflow:
    per-layer activation checkpointing inside its chunks."""
    selective: bool = False
    """chunkflow: selective recompute (its ``R`` actions skip attention)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; valid: {', '.join(METHODS)}")
        if (self.method == "chunkflow") != (self.chunk_size is not None and self.k is not None):
            raise ValueError(f"{self}: chunk_size and k are chunkflow's, and it needs both")
        if self.selective and self.method != "chunkflow":
            raise ValueError(f"{self}: selective recompute is chunkflow's")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch={self.micro_batch} must be at least 1")

    @property
    def label(self) -> str:
        if self.method == "chunkflow":
            return (f"chunkflow (chunk {self.chunk_size}, K={self.k}"
                    f"{', selective' if self.selective else ''}"
                    f"{', act. checkpointing' if self.recompute else ''})")
        if self.method == "packed":
            return ("Megatron packed, full recompute" if self.recompute
                    else "ideal: packed, no recompute")
        if self.method == "pad":
            return (f"Megatron padded (mbs {self.micro_batch}"
                    f"{', full recompute' if self.recompute else ''})")
        return (f"HF flattened (mbs {self.micro_batch}"
                f"{', grad. checkpointing' if self.recompute else ''})")


# Rows of `chunkflow bench`'s memory-budget table: each method's fastest configuration that fits.
BUDGET_METHODS = ("chunkflow", "Megatron padded", "Megatron packed", "HF flattened", "ideal")


@dataclass(frozen=True)
class BenchOptions:
    lengths: tuple[int, ...] = (4096, 16384, 32768)
    num_sequences: int = 16
    """Sequences per global batch: one of the maximum length, the rest LMSys-like."""
    steps: int = 1
    """Measured steps at the longest length, each on a different global batch; a length L
    gets ``steps * (longest // L)``, so every length measures about as many tokens."""
    chunk_size: int = 2048
    k: int = 1
    hf_micro_batch: int = 4
    """Examples per HF micro-batch (per_device_train_batch_size), flattened into one row."""
    pad_micro_batches: int = 1
    """Padded micro-batches actually run per step (all have the same shape; see the worker)."""
    memory_budget: int | None = 768 << 20
    """Bytes of peak step memory for the budget table; None skips it."""
    model: str = "cpu"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    output_dir: str = "benchmarks/results"

    def steps_at(self, max_len: int) -> int:
        return self.steps * max(1, max(self.lengths) // max_len)

    def __post_init__(self):
        for name in ("num_sequences", "steps", "chunk_size", "k", "hf_micro_batch",
                     "pad_micro_batches"):
            check_positive_int(name, getattr(self, name))
        if not self.lengths:
            raise ValueError("lengths: give at least one maximum length")
        for n in self.lengths:
            check_positive_int("lengths", n)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; valid: cpu, cuda")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}; valid: float32, bfloat16 (autocast)")


