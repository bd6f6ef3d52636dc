"""The command line that launches ``chunkflow plan --auto``'s choice: torchrun and the layout,
with the run's own options, and what the run's model can run (FSDP2, TP/PP) read off the family
table."""

from __future__ import annotations

import shlex


def run_options(config: str | None, given: dict) -> str:
    """The run's own options for the launch line: ``--config`` and every option given (LoRA,
    optimizer, data, ...), shell-quoted, less those the launch line sets itself."""
    return ((f" --config {shlex.quote(config)}" if config else "")
            + "".join(f" --{name}={shlex.quote(str(value))}"
                      for name, value in sorted(given.items()) if name not in LAUNCH_SETS))


LAUNCH_SETS = ("chunking.chunk_size", "chunking.k", "chunking.auto", "parallel.tp", "parallel.pp",
               "parallel.data_parallel", "parallel.sequence_parallel", "parallel.vocab_parallel",
               "parallel.schedule")
"""The options ``plan --auto``'s launch line sets itself (see :func:`launch_command`)."""


def fsdp_runs(cfg) -> bool:
    """Whether the run's model trains under FSDP2 (not LoRA, nor a mixture of experts: see
    chunkflow.parallel.data_parallel.apply_fsdp)."""
    family = cfg.model.hf_family()
    return cfg.lora.rank == 0 and (family is None or not family.experts)


def launch_command(best, *, gpus: int, run: str = " ...", fsdp: bool = True,
                   vocab_parallel: bool = True, explicit: bool = False) -> str:
    """The command line that trains with ``best`` (a chunkflow.sim.tune.Candidate) on ``gpus``
    GPUs: torchrun with 8 processes per node beyond one node. ``fsdp``: whether the model
    trains under FSDP2 (else DDP); ``vocab_parallel``: the run's ``--parallel.vocab_parallel``;
    ``explicit``: spell out the layout's defaults too (a config file may set others)."""
    if gpus == 1:
        launch = "chunkflow train"
    elif gpus <= 8:
        launch = f"torchrun --nproc-per-node {gpus} -m chunkflow train"
    else:
        launch = (f"torchrun --nnodes {-(-gpus // 8)} --nproc-per-node 8 --rdzv-backend c10d "
                  f"--rdzv-endpoint HOST:29500 -m chunkflow train")
    parts = [f"--chunking.chunk_size={best.chunk_size}", f"--chunking.k={best.k}"]
    if explicit:
        parts.append("--chunking.auto=false")
    if best.tp > 1 or explicit:
        parts.append(f"--parallel.tp={best.tp}")
    if best.tp > 1:
        if best.sp == 1:  # priced without sequence parallelism, as the run asked
            parts.append("--parallel.sequence_parallel=false")
        if not vocab_parallel:
            parts.append("--parallel.vocab_parallel=false")
    if best.pp > 1 or explicit:
        parts.append(f"--parallel.pp={best.pp}")
    schedule = getattr(best, "schedule", "1f1b")
    if schedule != "1f1b" or (explicit and best.pp > 1):
        parts.append(f"--parallel.schedule={schedule}")
    if best.dp > 1:  # the optimizer state is priced sharded over the replicas (FSDP2), but
        # a zero-bubble schedule runs with DDP (and was priced so)
        sharded = fsdp and schedule == "1f1b"
        parts.append(f"--parallel.data_parallel={'fsdp' if sharded else 'ddp'}")
    return f"{launch}{run} " + " ".join(parts)
