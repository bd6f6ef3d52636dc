"""``chunkflow plan``: a configured run previewed without training.

For given sequence lengths, or the run's first global batches as the trainer forms them: the chunk
plan (chains, packing), the schedule, and the peak memory the memory model predicts for the
configured model, dtypes, LoRA and chunk settings, beside the peak under each other recompute,
offload or activation-checkpointing setting.
"""

from __future__ import annotations

from chunkflow.plan import build_chunks, format_schedule, schedule
from chunkflow.plan.memory import estimate_peak_memory, state_extra_rows
from chunkflow.plan.units import BYTES_PER_ELEMENT, format_size
from chunkflow.train.build import configured_shape, describe_dtypes, model_label, trainable_params
from chunkflow.train.config import TrainConfig
from chunkflow.train.data.batching import first_batches


def preview_lengths(cfg: TrainConfig, lengths: list[int]) -> str:
    """One batch of ``lengths``: its plan and memory, every chunk, the schedule."""
    text, plan = _Pricing(cfg).describe(lengths)
    lines = [text]
    for chunk in plan.chunks:
        kind = (f"chain {chunk.chain_id} chunk {chunk.chain_idx}" if chunk.is_dependent
                else "standalone")
        segs = " ".join(f"s{s.seq_id}[{s.start}:{s.end}]" for s in chunk.segments)
        lines.append(f"  chunk {chunk.chunk_id:3d} {chunk.num_tokens:6d} tokens  {kind:20s} "
                     f"{segs}")
    chunking = cfg.chunking
    actions = schedule(plan, k=chunking.k, recompute=chunking.recompute)
    lines.append(f"schedule (k={chunking.k}): {format_schedule(actions)}")
    return "\n".join(lines)


def preview_data(cfg: TrainConfig, num_batches: int) -> str:
    """The run's first ``num_batches`` global batches: each one's plan and memory."""
    pricing = _Pricing(cfg)
    dataset, first = first_batches(cfg, num_batches)
    chunking = cfg.chunking
    lines = [f"data: {dataset.describe()}; chunk_size={chunking.chunk_size}, k={chunking.k}"]
    for i, (batch, _) in enumerate(first):
        text, _ = pricing.describe([len(ex) for ex in batch])
        lines.append(f"global batch {i + 1}: {text}")
    lines.append(f"data so far: {first[-1][1].summary(max_length=cfg.data.max_length)}")
    return "\n".join(lines)


class _Pricing:
    """The memory model's view of the configured run."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, chunking = cfg, cfg.chunking
        self.shape = configured_shape(cfg)
        self.trainable = trainable_params(cfg)
        param_dtype = cfg.param_dtype()
        self.param_bytes = BYTES_PER_ELEMENT[param_dtype]
        # bf16 autocast stores activations in bf16 (plan does not probe for a GPU: "auto"
        # counts as autocast only when the device is named cuda).
        autocast = cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto"
                                                    and cfg.train.device == "cuda")
        self.activation_bytes = 2 if autocast and param_dtype != "float64" else self.param_bytes
        self.configured = dict(recompute=chunking.recompute, offload=chunking.offload,
                               activation_checkpointing=chunking.activation_checkpointing)
        # offload runs on CUDA, where 16-bit runs' states hold a chunk more rows (varlen's
        # layout)
        self.extra_rows = state_extra_rows(chunking.attention_backend, "cuda",
                                           self.activation_bytes, chunking.chunk_size)

    def describe(self, lengths: list[int]):
        """(text, plan) of one batch of ``lengths``."""
        cfg, chunking, trainable = self.cfg, self.cfg.chunking, self.trainable
        plan = build_chunks(lengths, chunk_size=chunking.chunk_size,
                            pack_chain_tails=chunking.pack_chain_tails)

        def estimate(**options):
            return estimate_peak_memory(self.shape, plan, k=chunking.k,
                                        param_bytes=self.param_bytes,
                                        activation_bytes=self.activation_bytes,
                                        state_extra_rows=self.extra_rows,
                                        trainable_params=trainable,
                                        **{**self.configured, **options})

        mine = estimate()
        settings = ", ".join(f"{name}={value}" for name, value in self.configured.items()
                             if value not in ("full", "none", False))
        autocast = self.activation_bytes == 2 != self.param_bytes
        return (f"{plan.summary()}; longest sequence {max(lengths)} tokens\n"
                f"  estimated peak memory ({model_label(cfg)}, {describe_dtypes(cfg)}"
                f"{', bf16 autocast' if autocast else ''}"
                f"{f', LoRA ({trainable:,} trained parameters)' if trainable else ''}, "
                f"k={chunking.k}{', ' + settings if settings else ''}): {mine.summary()}\n"
                f"  {_alternatives(estimate, mine, self.configured)}"), plan


def _alternatives(estimate, mine, configured: dict) -> str:
    """The peak under each other recompute/offload/checkpointing setting (``chunkflow plan``):
    what selective recompute costs, what offload (CUDA) and checkpointing save."""
    changes = [dict(recompute="selective" if configured["recompute"] == "full" else "full"),
               dict(offload="state"), dict(recompute="selective", offload="all"),
               dict(offload="none"),
               dict(activation_checkpointing=not configured["activation_checkpointing"])]
    parts = []
    for change in changes:  # one setting changed (offload="all" needs selective recompute)
        option = {**configured, **change}
        if option == configured or (option["offload"] == "all"
                                    and option["recompute"] != "selective"):
            continue
        other = estimate(**option)
        if other.total == mine.total and not other.host:
            continue
        delta = other.total - mine.total
        name = ", ".join(f"{k}={str(v).lower()}" for k, v in option.items()
                         if v != configured[k])
        host = f", {format_size(other.host)} in host memory" if other.host else ""
        parts.append(f"{name}: {format_size(other.total)} "
                     f"({'+' if delta >= 0 else '-'}{format_size(abs(delta))}{host})")
    return "other settings: " + ("; ".join(parts) if parts else "the same peak")
