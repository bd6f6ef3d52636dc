"""``--chunking.auto``: chunk settings for this model, this data and this device.

The choice (:func:`chunkflow.plan.auto.choose_settings`) uses the memory and cost models on the
data's first ``SAMPLE_BATCHES`` global batches and on one sequence of the longest length the
data allows (``--data.max_length``, or the built-in data's ``synthetic_max_len``; without either,
the longest sampled, with a warning). It is written into ``cfg.chunking`` with ``auto`` switched
off, so the run's saved ``config.toml`` holds the settings it trained with and a resume keeps
them.
"""

from __future__ import annotations

import itertools

import torch

from chunkflow.plan.units import BYTES_PER_ELEMENT
from chunkflow.train.config import TrainConfig

SAMPLE_BATCHES = 8
CUDA_MARGIN = 0.10
"""Of the device's total memory, left out of the default budget (``--chunking.memory_budget``)."""


def memory_budget(cfg: TrainConfig, device: torch.device) -> tuple[int, str]:
    """(bytes, how they were found) for ``--chunking.auto``."""
    from chunkflow.plan.units import format_size, parse_size

    given = cfg.chunking.memory_budget
    if given is not None:
        try:
            budget = parse_size(given)
        except ValueError as e:
            raise ValueError(f"--chunking.memory_budget={given!r}: {e}") from None
        return budget, f"--chunking.memory_budget={given}"
    if device.type != "cuda":
        raise ValueError(f"--chunking.auto=true on {device.type}: give the memory to plan for, "
                         f"like --chunking.memory_budget=16GiB (only a CUDA device reports its "
                         f"free memory)")
    free, total = torch.cuda.mem_get_info(device)
    # the model is already on the device, and the estimate counts its weights itself
    free += torch.cuda.memory_allocated(device)
    budget = int(free - CUDA_MARGIN * total)
    if budget <= 0:
        raise ValueError(f"--chunking.auto=true: {device} has {format_size(free)} free of "
                         f"{format_size(total)}, less than the {CUDA_MARGIN:.0%} margin; give "
                         f"--chunking.memory_budget")
    return budget, (f"{device}'s free memory {format_size(free)} less {CUDA_MARGIN:.0%} of its "
                    f"{format_size(total)}")


def device_profile(device: torch.device):
    """The cost model's profile of ``device``: a known GPU by name, else the H100's factors (the
    choice depends on ratios of costs, not on absolute seconds); the CPU's own."""
    from chunkflow.plan.cost import CPU_PROFILE, GPU_PROFILES

    if device.type != "cuda":
        return CPU_PROFILE
    name = torch.cuda.get_device_name(device).lower()
    return GPU_PROFILES["a100-80gb"] if "a100" in name else GPU_PROFILES["h100-80gb"]


def choose_chunking(cfg: TrainConfig, dataset, device: torch.device, *, activation_bytes: int,
                    log=print, confirm: bool | None = None) -> str:
    """Pick the chunk settings, write them into ``cfg.chunking``; return the printed table.
    ``confirm`` (default: on CUDA): check the pick with a dry run of the step on fake tensors
    (:mod:`chunkflow.dryrun`) and take the next choice that fits the budget if it does not."""
    from chunkflow.plan.auto import choose_settings, format_choices
    from chunkflow.plan.memory import state_extra_rows
    from chunkflow.train.data.batching import global_batches
    from chunkflow.train.build import configured_shape, trainable_params
    from chunkflow.train.data.dataset import DataPosition, DataStats, FileDataset

    budget, source = memory_budget(cfg, device)
    batches = [[len(ex) for ex in batch] for batch, _, _ in itertools.islice(
        global_batches(dataset, cfg.data, DataPosition(), DataStats()), SAMPLE_BATCHES)]
    max_length = cfg.data.max_length
    if max_length is None and not isinstance(dataset, FileDataset):
        max_length = cfg.data.synthetic_max_len
    if max_length is None:
        log(f"warning: --chunking.auto planned memory for the longest of the first "
            f"{len(batches)} global batches' sequences ({max(max(b) for b in batches)} tokens); "
            f"a longer one later may not fit: set --data.max_length to bound it")
    param_bytes = BYTES_PER_ELEMENT[cfg.param_dtype()]
    try:
        choices = choose_settings(configured_shape(cfg), batches, memory_budget=budget,
                                  profile=device_profile(device), param_bytes=param_bytes,
                                  activation_bytes=activation_bytes, max_length=max_length,
                                  offload=device.type == "cuda",
                                  trainable_params=trainable_params(cfg),
                                  pack_chain_tails=cfg.chunking.pack_chain_tails,
                                  varlen_state=bool(state_extra_rows(
                                      cfg.chunking.attention_backend, device.type,
                                      activation_bytes, cfg.chunking.chunk_size)))
    except ValueError as e:
        raise ValueError(f"--chunking.auto=true (budget from {source}): {e}") from None
    confirmed = ""
    if device.type == "cuda" if confirm is None else confirm:
        choices, confirmed = _confirm(cfg, choices, batches, max_length, budget, device, log)
    best = choices[0].settings
    c = cfg.chunking
    c.chunk_size, c.k, c.recompute = best.chunk_size, best.k, best.recompute
    c.activation_checkpointing, c.offload = best.activation_checkpointing, best.offload
    c.auto = False  # the saved config is the run as it trains; a resume keeps these settings
    return (f"chunking.auto: {best} (memory budget {_fmt(budget)}: {source}; "
            f"{len(batches)} sample global batches, longest sequence planned for "
            f"{max_length or max(max(b) for b in batches)} tokens){confirmed}\n"
            f"{format_choices(choices)}")


CONFIRM_CHOICES = 5
"""How many of the best choices a dry run may try before giving up."""


def _confirm(cfg: TrainConfig, choices: list, batches: list[list[int]], max_length: int | None,
             budget: int, device: torch.device, log) -> tuple[list, str]:
    """The choices from the first whose dry run (the real step on fake tensors, on the sample
    batch holding the most tokens, its longest sequence stretched to ``max_length``) peaks
    within ``budget``, and a line saying how it went."""
    import copy
    import time

    from chunkflow.dryrun.layout import dry_run
    from chunkflow.plan.gpus import GPUSpec, spec_for_device

    lengths = list(max(batches, key=sum))
    if max_length is not None and max_length > max(lengths):
        lengths[lengths.index(max(lengths))] = max_length
    gpu = spec_for_device(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if gpu is None:  # a device not in the table: its capacity; speed is not asked here
        total = (torch.cuda.get_device_properties(device).total_memory
                 if device.type == "cuda" else budget)
        gpu = GPUSpec("this device", 1e15, 1e12, total, (), "torch.cuda.get_device_properties")
    for i, choice in enumerate(choices[:CONFIRM_CHOICES]):
        trial = copy.deepcopy(cfg)
        s = choice.settings
        c = trial.chunking
        c.chunk_size, c.k, c.recompute = s.chunk_size, s.k, s.recompute
        c.activation_checkpointing, c.offload = s.activation_checkpointing, s.offload
        t0 = time.perf_counter()
        peak = dry_run(trial, [lengths], gpu).peak_device_bytes
        took = time.perf_counter() - t0
        if peak <= budget:
            return choices[i:], (f"; confirmed by a dry run: peak {_fmt(peak)}, "
                                 f"{took:.0f} s{f', after {i} that did not fit' if i else ''}")
        log(f"chunking.auto: {s} does not fit by a dry run (peak {_fmt(peak)} against the "
            f"budget {_fmt(budget)}, {took:.0f} s): trying the next choice")
    raise ValueError(f"--chunking.auto=true: none of the {min(len(choices), CONFIRM_CHOICES)} "
                     f"best choices fits {_fmt(budget)} by a dry run of the step; valid: a "
                     f"larger --chunking.memory_budget, --data.max_length, or settings of "
                     f"your own (chunkflow plan --dry-run shows their peak)")


def _fmt(num_bytes: int) -> str:
    from chunkflow.plan.units import format_size

    return format_size(num_bytes)
