"""Typed training configuration: dataclass sections, a TOML file, and ``--section.field=value``.

Precedence: field defaults < ``--config FILE.toml`` < command-line overrides
(:mod:`chunkflow.train.arguments`). Every field carries its help text in ``metadata["help"]``;
``chunkflow train --help`` lists them with their defaults. Options naming files are stored
absolute.
The resolved configuration is written to ``config.toml`` in the run directory, and reading that
file back gives the same configuration (``None`` fields are left out: ``None`` is every such
field's default).

Unknown sections or fields are errors that suggest the closest valid names; values are checked
against their annotated type (``Literal`` choices, ``int``, ``float``, ``bool``, ``X | None``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chunkflow.train.pretrained import checkpoint_dtype, config_json, pretrained_defaults

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


DEFAULT_STEPS = 80
# Options that name files or directories: stored absolute (see TrainConfig.resolve_paths).
PATH_FIELDS = ("model.path", "data.path", "data.tokenizer", "train.output_dir",
               "checkpoint.resume_from", "eval.path")
CHAT_ROLES = ("system", "user", "assistant", "tool")


def absolute_path_option(name: str, value: str | None, *, base: str | Path | None = None
                         ) -> str | None:
    """``value`` of the path option ``name`` made absolute (each item of a comma-separated
    list; globs stay globs; 'auto' and 'byte' tokenizers stay as they are), relative ones
    against ``base`` (a config file's directory) or the working directory."""
    if value is None or (name == "data.tokenizer" and value in ("auto", "byte")):
        return value
    parts = value.split(",") if name in ("data.path", "eval.path") else [value]
    return ",".join(os.path.abspath(os.path.join(base or "", os.path.expanduser(p.strip())))
                    if p.strip() else p for p in parts)


def parse_role_map(text: str) -> dict[str, str]:
    """``"human=user,gpt=assistant"`` -> ``{"human": "user", "gpt": "assistant"}``."""
    mapping = {}
    for pair in text.split(","):
        src, sep, dst = (x.strip() for x in pair.partition("="))
        if not sep or not src or dst not in CHAT_ROLES:
            raise ValueError(f"--data.role_map={text!r}: {pair.strip()!r} is not from=to with to "
                             f"one of {', '.join(CHAT_ROLES)}; valid: e.g. "
                             f"'human=user,gpt=assistant'")
        mapping[src] = dst
    return mapping


def _f(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    preset: str = _f("tiny", "Model shape: one of chunkflow.models.PRESETS (tiny, qwen2.5-0.5b, "
                             "...); randomly initialised. Ignored with model.path.")
    path: str | None = _f(None, "A local Hugging Face model directory (config.json + "
                                "safetensors) to fine-tune; its tokenizer is used too.")
    implementation: Literal["hf", "reference"] = _f(
        "hf", "With model.path: 'hf' trains the transformers model as is; 'reference' loads "
              "its weights into chunkflow's reference model (Llama, Qwen2, Qwen3, Mistral).")
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = _f(
        "auto", "The model's dtype: frozen (LoRA base) weights are held in it, saved weights "
                "and merged/ are written in it; full fine-tuning of a bfloat16 model trains "
                "float32 master weights. auto = config.json's dtype with model.path (a float16 "
                "checkpoint loads as float32: chunkflow does not scale losses), float32 for "
                "presets.")
    vocab_size: int | None = _f(None, "Override the preset's vocabulary size (to fit a tokenizer).")

    def weights_dtype(self) -> str:
        """``dtype`` with ``auto`` resolved: the dtype the model's weights are saved in (and
        frozen weights held in)."""
        if self.dtype != "auto":
            return self.dtype
        if self.path is None:
            return "float32"
        stored = checkpoint_dtype(self.path)
        return "bfloat16" if stored == "bfloat16" else "float32"

    def dtype_source(self) -> str:
        """Where :meth:`weights_dtype` comes from, for the banner."""
        if self.dtype != "auto":
            return "--model.dtype"
        if self.path is None:
            return "the preset's default"
        stored = checkpoint_dtype(self.path)
        if stored in (None, "float32", "bfloat16"):
            return "config.json" if stored else "config.json names no dtype"
        return f"config.json's {stored}, loaded as float32"

    def hf_family(self):
        """The family table's row of model.path's transformers model
        (``--model.implementation=hf``), or None (chunkflow's reference model runs every
        layout)."""
        if self.path is None or self.implementation != "hf":
            return None
        from chunkflow.models.families import FAMILIES

        return FAMILIES.get(config_json(self.path).get("model_type"))

    def model_config(self):
        """The :class:`chunkflow.models.ModelConfig` these settings describe (for planning: the
        shape of model.path's checkpoint when it is Llama/Qwen2-like, else the preset's)."""
        from chunkflow.models.config import get_preset

        if self.path is not None:
            import json

            from chunkflow.models.hf_checkpoint import config_from_hf

            config_json = Path(self.path) / "config.json"
            try:
                config = config_from_hf(json.loads(config_json.read_text()),
                                        source=str(config_json))
            except FileNotFoundError:
                raise ValueError(f"--model.path={self.path!r}: no config.json there; valid: a "
                                 f"local Hugging Face model directory") from None
        else:
            config = get_preset(self.preset)
        return config if self.vocab_size is None else config.replace(vocab_size=self.vocab_size)


@dataclass
class DataSection:
    path: str | None = _f(None, "JSONL/Parquet files or globs, comma-separated. Unset: the "
                                "built-in synthetic long-tail data set.")
    format: Literal["auto", "jsonl", "parquet", "arrow"] = _f(
        "auto", "File format; auto = by extension (.parquet is Parquet, .arrow Arrow, anything "
                "else JSONL, gzip/zstd recognised by content). A Hugging Face datasets "
                "directory (save_to_disk) is read as its Arrow files.")
    tokenizer: str = _f("auto", "'byte' (built-in byte-level tokenizer), a local Hugging Face "
                                "tokenizer directory (its chat template is used for messages), "
                                "or 'auto': model.path's tokenizer if set, else byte.")
    text_field: str = _f("text", "Record field holding plain text.")
    messages_field: str = _f("messages", "Record field holding chat messages (role/content).")
    input_ids_field: str = _f("input_ids", "Record field holding pre-tokenised ids.")
    labels_field: str = _f("labels", "Record field holding labels for input_ids (-100 = ignored).")
    train_on: Literal["assistant", "all"] = _f("assistant", "Chat records: supervise assistant "
                                               "turns only, or every token.")
    add_eos: bool = _f(True, "Append the tokenizer's end-of-sequence token to text records.")
    batch_size: int = _f(32, "Sequences per global batch (one optimizer step each).")
    batch_tokens: int | None = _f(None, "Token budget per global batch instead of batch_size; a "
                                        "longer sequence forms a batch of its own.")
    max_length: int | None = _f(None, "Longest sequence kept whole. Unset: nothing is ever "
                                      "truncated or dropped.")
    overlong: Literal["truncate", "drop"] = _f("truncate", "What happens to sequences longer "
                                               "than max_length (counted and reported).")
    role_map: str | None = _f(None, "Rename chat roles before rendering, comma-separated "
                                    "from=to pairs (e.g. 'bot=assistant'; ShareGPT's human "
                                    "and gpt are read as user and assistant without it). "
                                    "Roles must end up in system, user, assistant, tool.")
    shuffle_buffer: int = _f(1000, "Records in the streaming shuffle buffer; 0 = file order.")
    prefetch: int = _f(2, "Global batches prepared ahead (read, tokenized, grouped, their "
                          "steps planned) in a background thread while a step trains; 0 = in "
                          "the training loop.")
    skip_invalid: bool = _f(False, "Skip malformed records (counted and reported) instead of "
                                   "stopping with an error.")
    synthetic_max_len: int = _f(8192, "Built-in data: longest sequence.")
    synthetic_min_len: int = _f(8, "Built-in data: shortest sequence.")


@dataclass
class ChunkingSection:
    chunk_size: int = _f(512, "Most tokens per chunk; sets peak activation memory.")
    k: int = _f(1, "Chunks of a chain that keep their activations; the rest are recomputed.")
    pack_chain_tails: bool = _f(True, "Pack short sequences into the free space of chains' "
                                      "last chunks.")
    loss_normalization: Literal["token", "sequence"] = _f(
        "token", "token: mean over supervised tokens of the global batch; sequence: mean of "
                 "per-sequence means.")
    attention_backend: Literal["auto", "cpu-flash", "varlen", "math", "sdpa"] = _f(
        "auto", "Attention kernel: auto (CPU: cpu-flash; CUDA: varlen for bf16/fp16 after a "
                "self-check, else math), cpu-flash, varlen, math (tiled, any device); sdpa is "
                "cpu-flash's old name.")
    activation_checkpointing: bool = _f(
        False, "Per-layer activation checkpointing inside a chunk: keeps each layer's input "
               "only, recomputes the rest in backward (memory below chunk_size and k).")
    recompute: Literal["full", "selective"] = _f(
        "full", "How chunks beyond k are recomputed: full (their whole forward again) or "
                "selective (their state forward keeps each layer's attention output and LSE, "
                "so the recompute skips attention; costs chunk x hidden per layer and chunk).")
    offload: Literal["none", "state", "all"] = _f(
        "none", "CUDA: keep the chains' key/value state (state), and with selective recompute "
                "also the kept attention outputs (all), in pinned host memory, a layer at a "
                "time on the GPU. On CPU it saves nothing.")
    auto: bool = _f(False, "Choose chunk_size, k, recompute, activation_checkpointing and "
                           "offload from the memory and cost models for this model and the "
                           "data's first global batches, within memory_budget; the choice is "
                           "printed and saved in the run's config.toml.")
    memory_budget: str | None = _f(
        None, "Device memory --chunking.auto may plan for, like 20GiB or 24000MB. Default on "
              "CUDA: the device's free memory less a tenth of its total (allocator fragmentation, "
              "CUDA context, NCCL buffers, kernel workspaces); required on CPU.")

    def options(self):
        """The engine's :class:`~chunkflow.runtime.options.ChunkingOptions` of these settings
        (built once, handed to the engine unchanged)."""
        from chunkflow.runtime.options import ChunkingOptions

        return ChunkingOptions(
            chunk_size=self.chunk_size, k=self.k, loss_normalization=self.loss_normalization,
            pack_chain_tails=self.pack_chain_tails, attention_backend=self.attention_backend,
            activation_checkpointing=self.activation_checkpointing, recompute=self.recompute,
            offload=self.offload)


@dataclass
class OptimSection:
    lr: float = _f(2e-3, "Peak learning rate (AdamW).")
    min_lr_ratio: float = _f(0.1, "Final learning rate of the cosine decay, as a fraction of lr.")
    warmup_steps: int = _f(10, "Linear warmup steps from 0 to lr.")
    warmup_ratio: float | None = _f(None, "Warmup as a fraction of the run's steps (instead "
                                          "of warmup_steps). With --model.path and neither "
                                          "set: 0.03.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value; 0 = no clipping.")


@dataclass
class TrainSection:
    steps: int | None = _f(None, f"Optimizer steps (global batches). Unset: "
                                 f"{DEFAULT_STEPS}, or as many as --train.epochs takes.")
    epochs: int | None = _f(None, "Passes over the data files instead of --train.steps: the "
                                  "step count is worked out from the data before training, "
                                  "and the last global batch may be smaller.")
    max_empty_batches: int = _f(10, "A global batch with no supervised token is skipped with a "
                                    "warning; this many in a row stop the run.")
    output_dir: str | None = _f(None, "Run directory (metrics.jsonl, config.toml, checkpoints). "
                                      "Unset: runs/train-<date>-<time>.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto = cuda when available, else cpu.")
    seed: int = _f(0, "Seed for weights, data order and synthetic data.")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms(True).")
    autocast: Literal["auto", "bf16", "none"] = _f("auto", "auto = bf16 autocast on CUDA, none "
                                                           "on CPU.")
    compile: bool = _f(False, "Compile each decoder layer (torch.compile, inductor; the chunk "
                              "attention a custom op). The first steps compile (seconds to "
                              "minutes); metrics.jsonl counts the graphs (compiled_graphs). "
                              "Not with the zero-bubble schedules.")


@dataclass
class LogSection:
    interval: int = _f(10, "Print a metrics line every N steps (metrics.jsonl gets every step).")
    progress: bool = _f(True, "Show a progress bar (loss, tokens/s, peak memory, ETA).")
    tensorboard: bool = _f(False, "Also write TensorBoard events to <output_dir>/tensorboard.")
    wandb: bool = _f(False, "Also log every step to Weights & Biases (pip install wandb); a "
                            "resumed run continues the same W&B run.")
    wandb_project: str = _f("chunkflow", "The W&B project.")
    wandb_name: str | None = _f(None, "The W&B run name. Unset: the run directory's name.")
    wandb_mode: Literal["auto", "online", "offline"] = _f(
        "auto", "offline: write the W&B run under <output_dir>/wandb without a network (wandb "
                "sync uploads it later); auto: wandb's default (WANDB_MODE).")


@dataclass
class CheckpointSection:
    interval: int = _f(50, "Save a checkpoint every N steps (and always at the end); 0 = only "
                           "at the end.")
    keep_last: int = _f(3, "Checkpoints kept; older ones are deleted after a new one is saved.")
    resume: bool | Literal["auto"] = _f(
        False, "Continue from the newest checkpoint in train.output_dir (same as --resume); "
               "auto: continue if it holds one, else start (same as --resume=auto: one "
               "command for a job that may be requeued).")
    resume_from: str | None = _f(None, "Continue from this checkpoint directory.")


@dataclass
class ParallelSection:
    pp: int = _f(1, "Pipeline stages (state-aware 1F1B); data-parallel replicas = number of "
                    "processes / (pp x tp). Launch with torchrun --nproc-per-node N -m "
                    "chunkflow train.")
    tp: int = _f(1, "Tensor-parallel ranks per pipeline stage (attention heads and MLP split "
                    "across them, Megatron-style); must divide the model's attention heads, "
                    "key/value heads and MLP width. Data-parallel replicas = processes / (pp x "
                    "tp).")
    sequence_parallel: bool = _f(
        True, "With tp > 1: run the embedding, norms, residual stream, output head and loss on "
              "1/tp of each chunk's rows per rank (attention and the MLP gather them), so "
              "those activations shrink by tp too; false: replicate them on every TP rank.")
    vocab_parallel: bool = _f(
        True, "With tp > 1: split the embedding and output head weights over the TP ranks by "
              "vocabulary rows (Megatron's vocabulary-parallel embedding and cross-entropy), "
              "so no rank holds their whole weights or a full-vocabulary logit; false: "
              "replicate them.")
    data_parallel: Literal["ddp", "fsdp"] = _f(
        "ddp", "ddp: replicated weights, gradients all-reduced once per step; fsdp: FSDP2 "
               "(fully_shard), weights, gradients and AdamW state sharded over the replicas "
               "(not for LoRA or mixture-of-experts models).")
    schedule: Literal["1f1b", "zb-h1", "zb-h2"] = _f(
        "1f1b", "Pipeline schedule with pp > 1: 1f1b (state-aware 1F1B) or zb-h1 (zero-bubble: "
                "each backward split into an input pass I and a weight pass W that fills the "
                "bubbles, with 1F1B's in-flight activations; not with activation "
                "checkpointing or FSDP). zb-h2 (twice the warm-up) is simulator-only for now "
                "(chunkflow simulate --schedule zb-h2).")
    timeout_s: float = _f(600.0, "Seconds a collective or send/receive may wait before the "
                                 "run fails (a dead or stuck rank becomes an error, not a hang).")


@dataclass
class LoraSection:
    rank: int = _f(0, "LoRA rank; 0 = no LoRA (every parameter is trained). Needs model.path "
                      "and model.implementation=hf.")
    alpha: float = _f(16.0, "LoRA alpha; adapters are scaled by alpha / rank.")
    dropout: float = _f(0.0, "LoRA dropout on the adapters' input. Every forward of a chunk, "
                             "its recompute included, draws the same mask.")
    target_modules: str = _f("all-linear", "Modules that get adapters: 'all-linear' (every "
                                           "linear layer but the output head) or "
                                           "comma-separated names, e.g. q_proj,v_proj.")
    modules_to_save: str | None = _f(None, "Modules trained fully next to the adapters and "
                                           "saved with them, comma-separated (e.g. "
                                           "embed_tokens,lm_head).")
    merge_on_save: bool = _f(False, "Also write the merged model (base + adapters) into every "
                                    "checkpoint's merged/ directory; the final checkpoint "
                                    "always gets one.")


@dataclass
class EvalSection:
    path: str | None = _f(None, "Held-out JSONL/Parquet files or globs (same record kinds as "
                                "data.path). Unset: no evaluation.")
    interval: int = _f(0, "Evaluate every N steps (and always at the end); 0 = only at the end.")
    max_batches: int | None = _f(None, "Global batches of held-out data per evaluation, from "
                                       "the start of the files. Unset: all of it.")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    chunking: ChunkingSection = field(default_factory=ChunkingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self) -> "TrainConfig":
        """Range checks that types alone cannot express; raises ValueError naming the option."""
        positive = ["data.batch_size", "data.batch_tokens", "data.max_length",
                    "data.synthetic_max_len", "data.synthetic_min_len", "chunking.chunk_size",
                    "chunking.k", "train.steps", "train.epochs", "train.max_empty_batches",
                    "log.interval", "checkpoint.keep_last", "model.vocab_size", "parallel.pp",
                    "parallel.tp", "parallel.timeout_s", "lora.alpha", "eval.max_batches"]
        non_negative = ["data.shuffle_buffer", "data.prefetch", "optim.warmup_steps",
                        "checkpoint.interval", "optim.weight_decay", "optim.grad_clip",
                        "optim.min_lr_ratio", "lora.rank", "eval.interval"]
        for name in positive + non_negative:
            value = self.get(name)
            if value is None:
                continue
            if name in positive and value <= 0:
                what = "a positive integer" if isinstance(value, int) else "positive"
                raise ValueError(f"--{name}={value}: must be {what}")
            if name in non_negative and value < 0:
                raise ValueError(f"--{name}={value}: must be >= 0")
        for name in FIELDS:
            value = self.get(name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{name}={value}: must be a finite number")
        for name in ("optim.lr", "optim.eps"):
            if self.get(name) <= 0:
                raise ValueError(f"--{name}={self.get(name)}: must be positive")
        for name in ("optim.beta1", "optim.beta2"):
            if not 0 <= self.get(name) < 1:
                raise ValueError(f"--{name}={self.get(name)}: must be in [0, 1)")
        ratio = self.optim.warmup_ratio
        if ratio is not None and not 0 <= ratio < 1:
            raise ValueError(f"--optim.warmup_ratio={ratio}: must be in [0, 1)")
        if self.optim.min_lr_ratio > 1:
            raise ValueError(f"--optim.min_lr_ratio={self.optim.min_lr_ratio}: must be in [0, 1]")
        if self.data.synthetic_min_len > self.data.synthetic_max_len:
            raise ValueError(f"--data.synthetic_min_len={self.data.synthetic_min_len} exceeds "
                             f"--data.synthetic_max_len={self.data.synthetic_max_len}")
        if self.train.steps is not None and self.train.epochs is not None:
            raise ValueError(f"--train.steps={self.train.steps} and --train.epochs="
                             f"{self.train.epochs}: set one of them")
        if not 0 <= self.lora.dropout < 1:
            raise ValueError(f"--lora.dropout={self.lora.dropout}: must be in [0, 1)")
        if self.data.role_map is not None:
            parse_role_map(self.data.role_map)
        from chunkflow.models.config import PRESETS

        if self.model.preset.lower() not in PRESETS:
            raise ValueError(f"--model.preset={self.model.preset!r}: known presets are "
                             f"{', '.join(PRESETS)}")
        return self

    def param_dtype(self) -> str:
        """The dtype the model's parameters are held in while training: the model's
        (:meth:`ModelSection.weights_dtype`), except full fine-tuning of a bfloat16 model,
        whose parameters are float32 master weights (bfloat16 weights would lose the small
        updates of fine-tuning, and chunks' gradients would accumulate in bfloat16). LoRA's
        adapters train in float32 on a 16-bit base (peft's default)."""
        dtype = self.model.weights_dtype()
        return "float32" if dtype == "bfloat16" and self.lora.rank == 0 else dtype

    @property
    def num_steps(self) -> int | None:
        """--train.steps, its default when neither steps nor epochs is set, None with epochs."""
        if self.train.epochs is not None:
            return self.train.steps
        return DEFAULT_STEPS if self.train.steps is None else self.train.steps

    def resolve_paths(self) -> "TrainConfig":
        """Make every file or directory option absolute (relative to the working directory),
        so that the saved config.toml means the same files from any directory."""
        for name in PATH_FIELDS:
            section, key = name.split(".")
            setattr(getattr(self, section), key, absolute_path_option(name, self.get(name)))
        return self

    def get(self, name: str) -> Any:
        section, key = name.split(".")
        return getattr(getattr(self, section), key)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Write as TOML (``None`` fields omitted); ``load_config(path)`` reads it back."""
        import tomli_w

        data = {s: {k: v for k, v in d.items() if v is not None}
                for s, d in self.to_dict().items()}
        # Where this run resumed from is not part of what it is: a later --resume of this run
        # must continue its own checkpoints.
        data["checkpoint"].pop("resume", None)
        data["checkpoint"].pop("resume_from", None)
        path.write_text(tomli_w.dumps(data))


SECTIONS: dict[str, type] = typing.get_type_hints(TrainConfig)


def _fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """'section.field' -> (section, Field, resolved type annotation)."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = (section, f, hints[f.name])
    return out


FIELDS = _fields()


def suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _convert(name: str, value: Any, annotation: Any, *, from_text: bool) -> Any:
    """Check ``value`` against ``annotation``; parse it first when it came from the command line."""
    args = typing.get_args(annotation)
    if bool in args:  # bool | Literal[...]: a choice by name, else true or false
        (choices,) = [a for a in args if typing.get_origin(a) is Literal]
        if value in typing.get_args(choices):
            return value
        try:
            return _convert(name, value, bool, from_text=from_text)
        except ValueError:
            raise ValueError(f"--{name}={value!r}: valid values are true, false, "
                             f"{', '.join(repr(a) for a in typing.get_args(choices))}") from None
    if type(None) in args:  # X | None
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        if value not in args:
            raise ValueError(f"--{name}={value!r}: valid values are "
                             f"{', '.join(repr(a) for a in args)}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if from_text and text in ("true", "1", "yes", "on"):
            return True
        if from_text and text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--{name}={value!r}: expected true or false")
    if annotation is int:
        if from_text:
            try:
                value = int(str(value).replace("_", ""))
            except ValueError:
                raise ValueError(f"--{name}={value!r}: expected an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"--{name}={value!r}: expected an integer")
        return value
    if annotation is float:
        if from_text:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"--{name}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--{name}={value!r}: expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"--{name}={value!r}: expected a string")
        return value
    raise AssertionError(f"unhandled annotation {annotation!r} for {name}")


def _apply(config: TrainConfig, name: str, value: Any, *, from_text: bool, where: str) -> None:
    if name not in FIELDS:
        raise ValueError(f"{where}unknown option {name!r}{suggest(name, FIELDS)}")
    section, f, annotation = FIELDS[name]
    try:
        value = _convert(name, value, annotation, from_text=from_text)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    setattr(getattr(config, section), f.name, value)


def read_toml(path: str | Path, config: TrainConfig | None = None, *,
              given: set[str] | None = None) -> TrainConfig:
    """Apply a TOML file's ``[section] field = value`` entries to ``config`` (or the defaults);
    relative paths in it are relative to the file. ``given`` collects the names it sets."""
    config = config or TrainConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} cannot be read ({e}); valid: a TOML "
                         f"text file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    for section, entries in data.items():
        if section not in SECTIONS:
            raise ValueError(f"{path}: unknown section [{section}]{suggest(section, SECTIONS)}; "
                             f"sections are {', '.join(SECTIONS)}")
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: {section} must be a [{section}] table")
        for key, value in entries.items():
            name = f"{section}.{key}"
            _apply(config, name, value, from_text=False, where=f"{path}: ")
            if name in PATH_FIELDS:  # relative to the file, wherever it is run from
                setattr(getattr(config, section), key, absolute_path_option(
                    name, config.get(name), base=path.absolute().parent))
            if given is not None:
                given.add(name)
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or ``base``), then the TOML file, then ``{"section.field": value}`` overrides
    (text or typed); paths made absolute, values checked."""
    config = base if base is not None else TrainConfig()
    given: set[str] = set()
    if path is not None:
        read_toml(path, config, given=given)
    for name, value in (overrides or {}).items():
        _apply(config, name, value, from_text=isinstance(value, str), where="")
        given.add(name)
    if base is None:  # a resumed run's saved configuration already holds its values
        config.notes = pretrained_defaults(config, given)
    return config.resolve_paths().validate()


def config_from_dict(data: dict[str, dict[str, Any]], *, where: str) -> TrainConfig:
    """A configuration from ``TrainConfig.to_dict()`` output (as checkpoints store it)."""
    config = TrainConfig()
    for section, entries in data.items():
        if section not in SECTIONS or not isinstance(entries, dict):
            raise ValueError(f"{where}: unknown configuration section {section!r}")
        for key, value in entries.items():
            if value is not None:
                _apply(config, f"{section}.{key}", value, from_text=False, where=f"{where}: ")
    return config
