"""Cost model: seconds and bytes of one chunk (or micro-batch) on one pipeline stage. Stdlib only.

A chunk is given as its segment lengths plus the chain prefix of its first segment (the tokens of
the same sequence in earlier chunks, whose keys/values it attends to); a Megatron-LM micro-batch is
one segment with no prefix. A stage holds ``stage_layers[s]`` decoder layers; the embedding lives
on the first stage, the final norm, output head and loss on the last.

Time = FLOPs / achieved rate, per GPU of a TP group (every matmul and every attention head is
split over ``tp`` GPUs), plus the tensor-parallel collectives and a fixed per-layer launch cost:

* matmuls: 2 FLOPs per parameter per token (q/k/v/o, SwiGLU gate/up/down; the head's E x V on the
  last stage); backward = 2 x forward (input and weight gradients);
* attention, per segment of n query tokens after a prefix of p keys (causal):
  ``4 * H * D * (n * p + n * (n + 1) / 2)`` (QK^T and PV). Chunk j of a chain has p = j x chunk
  size: uniform chunks are *not* uniform in cost. Backward = 2.5 x forward: a FlashAttention
  backward runs five matmuls of that size (recomputed QK^T, dV, dP, dQ, dK) against two;
* achieved rate = peak x efficiency x n / (n + n_half) (:class:`GPUProfile`): a GEMM with few rows
  (a micro-batch of a 200-token sequence) cannot fill the GPU, which is what packing short
  sequences into chunks wins back;
* sequence + tensor parallelism: per layer and pass two all-gathers and two reduce-scatters of the
  chunk's n x E hidden states over NVLink, not overlapped with compute (Megatron's default);
* recompute: a chunkflow ``R`` or ``S`` costs one forward; a selective ``r`` (chunkflow's
  ``recompute="selective"``) one forward without the attention kernel, whose output its ``s``
  kept. Megatron's layer recompute adds to the backward: ``selective`` (core attention, with flash attention the only thing it recomputes)
  one attention forward, ``full`` the forward of every decoder layer (not the head).

Memory per GPU, reusing :mod:`chunkflow.plan.memory`'s per-token activation and KV-state
formulas (bf16 activations, float32 KV gradients), with ``sp == tp`` sequence parallelism sharding
every per-token activation over the TP group; KV heads are split over TP (replicated where
``tp`` exceeds the number of KV heads). Megatron's ``selective`` recompute keeps what no
recompute keeps (with flash attention there are no attention scores to drop); ``full`` keeps only
each layer's input (E values per token and layer) and, during a backward, one layer's full
activations.

Static memory (Megatron mixed precision): bf16 weights (2 bytes/param) + float32 main gradients
(4) + float32 master weights and Adam moments (12), the last sharded over the data-parallel
replicas with the distributed optimizer (Megatron's ``--use-distributed-optimizer``, default
here): ``6 + 12 / dp`` bytes per parameter, else 18. chunkflow's bf16 runs come to the same
bytes: float32 weights (4), their bf16 autocast copies (2), float32 gradients (4) and AdamW's
moments (8), 18 in all; under FSDP2 the bf16 weights and float32 gradients gathered (6), the
float32 weights and moments sharded (12 / dp). Its gradients appear with the first backward
(:meth:`CostModel.grad_bytes`).

Not modelled (each small against the terms above at the paper's scale): embedding lookup, the
loss's elementwise work, the head's extra all-gather, optimizer step time, CUDA context and
allocator fragmentation, vocabulary padding, pipeline P2P sizes other than a mean micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, asdict, dataclass
from types import SimpleNamespace
from typing import NamedTuple, Sequence

from chunkflow.plan.chunks import Chunk, check_positive_int
from chunkflow.plan.memory import activation_bytes_per_token, fused_head, kv_state_bytes

RECOMPUTE = ("none", "selective", "full")
"""Megatron-LM's layer recompute: none, ``selective`` (core attention), ``full`` (all layers)."""

GPUS_PER_NODE = 8
"""TP groups stay inside a node (NVLink); a layout wider than a node talks over the network."""


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only Llama/Qwen2-style model; field names as ``ModelConfig``'s."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    """Qwen2 has biases on the q/k/v projections (and none on o_proj)."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            check_positive_int(f"ModelShape.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_config(cls, config, *, qkv_bias: bool | None = None) -> "ModelShape":
        """The shape of a model config (call ``chunkflow.models.families.model_shape``, which
        knows each family's q/k/v biases and passes ``qkv_bias``); without ``qkv_bias``, the
        config's ``qkv_bias`` or ``attention_bias``."""
        heads = config.num_attention_heads
        if qkv_bias is None:
            qkv_bias = getattr(config, "qkv_bias", None)
        if qkv_bias is None:
            qkv_bias = bool(getattr(config, "attention_bias", False))
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size,
                   num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads,
                   num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=bool(qkv_bias))

    @property
    def params_per_layer(self) -> int:
        e, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = e * (q + 2 * kv) + q * e + (q + 2 * kv) * self.qkv_bias
        return attn + 3 * e * self.intermediate_size + 2 * e  # + two RMSNorm weights

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * self.params_per_layer + embed + self.hidden_size


def _qwen25(hidden, inter, layers, heads, kv):
    return ModelShape(vocab_size=152064, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hidden // heads)


MODEL_SHAPES: dict[str, ModelShape] = {
    # config.json of Qwen/Qwen2.5-{7B,14B,32B,72B} (untied embeddings, head_dim 128).
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8),
}


def get_model_shape(name: str) -> ModelShape:
    try:
        return MODEL_SHAPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_SHAPES)}") from None


@dataclass(frozen=True)
class GPUProfile:
    """Peak numbers of one GPU and the fractions of them a training step achieves.

    The factors are ours, chosen from public kernel benchmarks, not fitted to the paper:

    * ``matmul_efficiency``: large bf16 GEMMs reach ~80-90% of peak on A100 and ~70-75% on H100
      (cuBLAS); the norms, SwiGLU, RoPE and residual adds between them are memory-bound and cost
      relatively more on H100 (3.2x the FLOP/s of A100, 1.7x the bandwidth): 0.65 and 0.55;
    * ``attention_efficiency``: FlashAttention-2 forward ~70% and backward ~55% of peak on A100
      (0.6); on H100 FA2/cuDNN-class kernels (not FA3) run at ~40-50% (0.45);
    * ``tokens_half_efficiency``: a GEMM of n rows reaches half its large-n rate near
      n = 256 (A100, 108 SMs) / 512 (H100, 132 faster SMs): below about one wave of 128-row
      tiles over the column blocks the GPU idles;
    * ``layer_overhead_s``: kernel launches and collective latencies of one decoder layer's
      forward (~20 kernels and 4 collectives): 0.1 ms; a backward costs twice that;
    * ``nvlink_bytes_per_s``: achieved all-gather/reduce-scatter bus bandwidth, ~80% of NVLink's
      300 (A100) / 450 (H100) GB/s per direction; ``network_bytes_per_s``: one 200 (A100) /
      400 (H100) Gb/s InfiniBand NIC per GPU at ~80%;
    * ``host_bytes_per_s``: pinned host <-> device copies (offload), ~80% of PCIe 4.0 x16's
      32 GB/s (A100) / PCIe 5.0's 64 GB/s (H100).
    """

    name: str
    peak_flops: float
    """Dense bf16 FLOP/s."""
    memory_bytes: int
    matmul_efficiency: float
    attention_efficiency: float
    tokens_half_efficiency: int
    layer_overhead_s: float
    nvlink_bytes_per_s: float
    network_bytes_per_s: float
    host_bytes_per_s: float = 25e9


GPU_PROFILES: dict[str, GPUProfile] = {
    "a100-80gb": GPUProfile("A100-80GB", peak_flops=312e12, memory_bytes=80 * 2**30,
                            matmul_efficiency=0.65, attention_efficiency=0.6,
                            tokens_half_efficiency=256, layer_overhead_s=1e-4,
                            nvlink_bytes_per_s=240e9, network_bytes_per_s=20e9),
    "h100-80gb": GPUProfile("H100-80GB", peak_flops=989e12, memory_bytes=80 * 2**30,
                            matmul_efficiency=0.55, attention_efficiency=0.45,
                            tokens_half_efficiency=512, layer_overhead_s=1e-4,
                            nvlink_bytes_per_s=360e9, network_bytes_per_s=40e9,
                            host_bytes_per_s=50e9),
}

CPU_PROFILE = GPUProfile("CPU", peak_flops=2e11, memory_bytes=0, matmul_efficiency=0.5,
                         attention_efficiency=0.5, tokens_half_efficiency=32,
                         layer_overhead_s=5e-4, nvlink_bytes_per_s=10e9,
                         network_bytes_per_s=10e9, host_bytes_per_s=10e9)
"""A few-core AVX2/AVX-512 host in float32, for ranking settings on CPU (``chunkflow.plan.auto``),
not for predicting its seconds: matmuls at half of ~150 GFLOP/s and saturating from a few dozen
rows; attention (the CPU flash kernel) at a quarter; 0.5 ms of Python and dispatch per layer."""


def get_gpu(name: str) -> GPUProfile:
    try:
        return GPU_PROFILES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPU_PROFILES)}") from None


class Flops(NamedTuple):
    """Forward FLOPs of one chunk on one stage, per GPU of the TP group."""

    layers_matmul: float
    head_matmul: float
    attention: float


def chunk_segments(chunk: Chunk) -> tuple[list[int], int]:
    """(segment lengths, prefix of the first segment) of a planned chunk."""
    prefix = chunk.segments[0].start if chunk.is_dependent else 0
    return [s.num_tokens for s in chunk.segments], prefix


def attention_pairs(segment_lens: Sequence[int], prefix_len: int = 0) -> int:
    """Causal (query, key) pairs: the first segment's n queries also see ``prefix_len`` keys."""
    pairs = sum(n * (n + 1) // 2 for n in segment_lens)
    return pairs + (segment_lens[0] * prefix_len if segment_lens else 0)


def forward_flops(shape: ModelShape, segment_lens: Sequence[int], *, prefix_len: int = 0,
                  num_layers: int | None = None, head: bool = True, tp: int = 1) -> Flops:
    """Forward FLOPs of one chunk through ``num_layers`` decoder layers (default: all) and, with
    ``head``, the output head, per GPU of a TP group of ``tp``."""
    s, n = shape, sum(segment_lens)
    e, d, h = s.hidden_size, s.head_dim, s.num_attention_heads // tp
    # per GPU: q and o (h heads), k and v (its KV heads, replicated past their number), SwiGLU
    linear = (2 * e * h * d + 2 * e * math.ceil(s.num_key_value_heads / tp) * d
              + 3 * e * s.intermediate_size // tp)
    layers = s.num_hidden_layers if num_layers is None else num_layers
    head_flops = 2 * n * e * s.vocab_size / tp if head else 0.0
    return Flops(layers_matmul=2.0 * n * linear * layers, head_matmul=head_flops,
                 attention=4.0 * h * d * attention_pairs(segment_lens, prefix_len) * layers)


@dataclass(frozen=True)
class CostModel:
    """Seconds and bytes per GPU for ``shape`` on ``gpu`` under a <TP, SP, PP, DP> layout."""

    shape: ModelShape
    gpu: GPUProfile
    _: KW_ONLY
    tp: int = 1
    pp: int = 1
    sp: int | None = None
    """Sequence parallelism runs over the TP group (Megatron, and chunkflow by default):
    ``None`` means ``tp``; 1 means none (chunkflow's ``--parallel.sequence_parallel=false``):
    every per-token activation counted whole on each TP rank, an upper bound, since the
    attention and MLP internals are split by heads."""
    vocab_parallel: bool = True
    """The embedding and output head split over TP (Megatron, and chunkflow by default); False:
    replicated on every TP rank (chunkflow's ``--parallel.vocab_parallel=false``), their weights
    whole on each. The head's FLOPs are split either way under sequence parallelism (each rank
    runs the head on its rows); without either, every rank computes the whole head."""
    gathered_inputs: bool = False
    """Under sequence parallelism, whether the attention and MLP inputs are kept all-gathered for
    their projections' backward (chunkflow: DTensor saves the gathered input) rather than
    gathered again in backward (Megatron): 2 hidden-size activations per token and layer that
    do not shrink by ``sp``."""
    dp: int = 1
    recompute: str = "none"
    """Megatron's layer recompute (see ``RECOMPUTE``); chunkflow's own is its S/R actions."""
    distributed_optimizer: bool = True
    activation_bytes: int = 2
    """bf16 activations; the KV state's gradients use max(this, 4) bytes (float32)."""
    matmul_backward_factor: float = 2.0
    attention_backward_factor: float = 2.5

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "activation_bytes"):
            check_positive_int(name, getattr(self, name))
        if self.sp is None:
            object.__setattr__(self, "sp", self.tp)
        if self.sp not in (1, self.tp):
            raise ValueError(f"sp={self.sp} with tp={self.tp}: sequence parallelism runs over the "
                             f"tensor-parallel group, so sp must equal tp (or 1: none)")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}; valid: {', '.join(RECOMPUTE)}")
        s = self.shape
        if s.num_attention_heads % self.tp or s.intermediate_size % self.tp:
            raise ValueError(f"tp={self.tp} must divide num_attention_heads="
                             f"{s.num_attention_heads} and intermediate_size={s.intermediate_size}")
        if self.pp > s.num_hidden_layers:
            raise ValueError(f"pp={self.pp} exceeds the {s.num_hidden_layers} layers")

    # ---- layout -------------------------------------------------------------------------------

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Decoder layers per stage; a remainder goes to the first stages (the last has the
        head)."""
        q, r = divmod(self.shape.num_hidden_layers, self.pp)
        return tuple(q + (s < r) for s in range(self.pp))

    @property
    def kv_heads_per_gpu(self) -> int:
        return math.ceil(self.shape.num_key_value_heads / self.tp)

    def _is_last(self, stage_idx: int) -> bool:
        if not 0 <= stage_idx < self.pp:
            raise ValueError(f"stage_idx={stage_idx} is not a stage of pp={self.pp} "
                             f"(0..{self.pp - 1})")
        return stage_idx == self.pp - 1

    # ---- time ---------------------------------------------------------------------------------

    def forward_flops(self, segment_lens: Sequence[int], *, prefix_len: int = 0,
                      stage_idx: int = 0) -> Flops:
        layers = self.stage_layers[stage_idx]
        flops = forward_flops(self.shape, segment_lens, prefix_len=prefix_len,
                              num_layers=layers, head=self._is_last(stage_idx), tp=self.tp)
        if not self.vocab_parallel and self.sp == 1:  # every TP rank computes the whole head
            flops = flops._replace(head_matmul=flops.head_matmul * self.tp)
        return flops

    def _rolloff(self, num_tokens: int) -> float:
        return num_tokens / (num_tokens + self.gpu.tokens_half_efficiency)

    def _parts(self, segment_lens, prefix_len, stage_idx) -> tuple[float, float, float, float]:
        """Forward seconds of (layer matmuls, head matmul, attention, comm + launch overhead)."""
        n = sum(segment_lens)
        if n <= 0:
            raise ValueError(f"a chunk needs tokens, got segment lengths {list(segment_lens)}")
        f = self.forward_flops(segment_lens, prefix_len=prefix_len, stage_idx=stage_idx)
        mm_rate = self.gpu.peak_flops * self.gpu.matmul_efficiency * self._rolloff(n)
        attn_rate = self.gpu.peak_flops * self.gpu.attention_efficiency * self._rolloff(n)
        layers = self.stage_layers[stage_idx]
        collective = n * self.shape.hidden_size * self.activation_bytes * (self.tp - 1) / self.tp
        fixed = layers * (self.gpu.layer_overhead_s + 4 * collective / self.gpu.nvlink_bytes_per_s)
        return f.layers_matmul / mm_rate, f.head_matmul / mm_rate, f.attention / attn_rate, fixed

    def forward_seconds(self, segment_lens: Sequence[int], *, prefix_len: int = 0,
                        stage_idx: int = 0) -> float:
        return sum(self._parts(segment_lens, prefix_len, stage_idx))

    def recompute_seconds(self, segment_lens: Sequence[int], *, prefix_len: int = 0,
                          stage_idx: int = 0, selective: bool = False) -> float:
        """A chunkflow ``R`` (or ``S``): the chunk's forward once more; ``selective``: without
        the attention kernel (an ``r`` reuses the output its ``s`` kept)."""
        mm, head, attn, fixed = self._parts(segment_lens, prefix_len, stage_idx)
        return mm + head + fixed + (0.0 if selective else attn)

    def activation_checkpointing_seconds(self, segment_lens: Sequence[int], *,
                                         prefix_len: int = 0, stage_idx: int = 0) -> float:
        """What per-layer activation checkpointing adds to a backward: the decoder layers'
        forward once more (not the head)."""
        mm, _, attn, fixed = self._parts(segment_lens, prefix_len, stage_idx)
        return mm + attn + fixed

    def backward_seconds(self, segment_lens: Sequence[int], *, prefix_len: int = 0,
                         stage_idx: int = 0) -> float:
        """Backward, including Megatron's layer recompute when ``recompute`` asks for it."""
        mm, head, attn, fixed = self._parts(segment_lens, prefix_len, stage_idx)
        t = (self.matmul_backward_factor * (mm + head) + self.attention_backward_factor * attn
             + 2 * fixed)
        if self.recompute == "selective":
            t += attn
        elif self.recompute == "full":
            t += mm + attn + fixed
        return t

    def weight_backward_seconds(self, segment_lens: Sequence[int], *, prefix_len: int = 0,
                                stage_idx: int = 0) -> float:
        """A zero-bubble ``W``: the weight half of the matmuls' backward (each weight gradient
        is one matmul, as the input gradient is) and its share of the fixed overhead. The
        attention backward is all in the ``I`` (it yields the input and key/value gradients)."""
        mm, head, _, fixed = self._parts(segment_lens, prefix_len, stage_idx)
        return self.matmul_backward_factor / 2 * (mm + head) + fixed

    def input_backward_seconds(self, segment_lens: Sequence[int], *, prefix_len: int = 0,
                               stage_idx: int = 0) -> float:
        """A zero-bubble ``I``: the backward but for its ``W`` part (:meth:`backward_seconds`
        = ``I`` + ``W``)."""
        return (self.backward_seconds(segment_lens, prefix_len=prefix_len, stage_idx=stage_idx)
                - self.weight_backward_seconds(segment_lens, prefix_len=prefix_len,
                                               stage_idx=stage_idx))

    def p2p_seconds(self, num_tokens: float) -> float:
        """Send one micro-batch's hidden states (sequence-sharded over SP) to the next stage."""
        bw = (self.gpu.nvlink_bytes_per_s if self.tp * self.pp <= GPUS_PER_NODE
              else self.gpu.network_bytes_per_s)
        return num_tokens * self.shape.hidden_size * self.activation_bytes / self.sp / bw

    def grad_sync_seconds(self, stage_idx: int = 0) -> float:
        """Data-parallel gradient reduction (float32 main grads, ring), not overlapped."""
        if self.dp == 1:
            return 0.0
        bw = (self.gpu.nvlink_bytes_per_s if self.num_gpus <= GPUS_PER_NODE
              else self.gpu.network_bytes_per_s)
        return 2 * 4 * self.stage_params(stage_idx) * (self.dp - 1) / self.dp / bw

    # ---- memory -------------------------------------------------------------------------------

    def _namespace(self, num_layers: int, kv_heads: int):
        fields = asdict(self.shape)
        fields.update(num_hidden_layers=num_layers, num_key_value_heads=kv_heads, num_params=0)
        return SimpleNamespace(**fields)

    def _token_bytes(self, num_tokens: int | None = None) -> tuple[float, float]:
        """(one decoder layer, head) activation bytes of a token over the TP group, no
        recompute; the head without log-probabilities in a chunk of ``num_tokens`` whose logits
        (on this rank's vocabulary shard) take the runtime's fused cross-entropy."""
        kv_heads = self.kv_heads_per_gpu * self.tp  # replicated heads count once per GPU
        head = activation_bytes_per_token(self._namespace(0, kv_heads),
                                          activation_bytes=self.activation_bytes)
        layer = activation_bytes_per_token(self._namespace(1, kv_heads),
                                           activation_bytes=self.activation_bytes) - head
        vocab = self.shape.vocab_size // (self.tp if self.vocab_parallel else 1)
        if num_tokens is not None and fused_head(num_tokens, vocab, self.activation_bytes):
            head -= max(self.activation_bytes, 4) * self.shape.vocab_size
        return layer, head

    def activation_bytes_per_token(self, stage_idx: int = 0,
                                   num_tokens: int | None = None) -> float:
        """Bytes a micro-batch (a chunk of ``num_tokens``: its size decides the head's path)
        keeps per token from its forward to its backward on the stage."""
        layer, head = self._token_bytes(num_tokens)
        if self.recompute == "full":
            layer = self.activation_bytes * self.shape.hidden_size  # the layer's input only
        layers = self.stage_layers[stage_idx]
        total = (layers * layer + (head if self._is_last(stage_idx) else 0)) / self.sp
        if self.gathered_inputs and self.recompute != "full":
            total += layers * 2 * self.shape.hidden_size * self.activation_bytes * (
                1 - 1 / self.sp)
        return total

    def backward_transient_bytes(self, num_tokens: int, stage_idx: int = 0) -> float:
        """Extra bytes while a micro-batch runs backward: one recomputed layer under ``full``."""
        self._is_last(stage_idx)  # validates stage_idx
        return num_tokens * self._token_bytes()[0] / self.sp if self.recompute == "full" else 0.0

    def kept_attention_bytes(self, num_tokens: int, stage_idx: int = 0) -> float:
        """What a selective ``s`` keeps of ``num_tokens`` tokens on the stage's layers until its
        ``r``: the attention output (its heads on this GPU, ``activation_bytes``) and the
        float32 log-sum-exp per head."""
        s = self.shape
        heads = s.num_attention_heads // self.tp
        per_token = heads * (s.head_dim * self.activation_bytes + max(self.activation_bytes, 4))
        return float(self.stage_layers[stage_idx] * num_tokens * per_token)

    def kv_state_bytes(self, num_positions: int, stage_idx: int = 0) -> int:
        """Keys/values (and their float32 gradients) of ``num_positions`` positions on the
        stage's layers."""
        ns = self._namespace(self.stage_layers[stage_idx], self.kv_heads_per_gpu)
        return kv_state_bytes(ns, num_positions, activation_bytes=self.activation_bytes)

    def stage_params(self, stage_idx: int = 0) -> float:
        """Parameters one GPU of the stage holds (norm weights are replicated over TP)."""
        s = self.shape
        e, d = s.hidden_size, s.head_dim
        q, kv = s.num_attention_heads * d // self.tp, self.kv_heads_per_gpu * d
        layer = (e * (q + 2 * kv) + q * e + (q + 2 * kv) * s.qkv_bias
                 + 3 * e * s.intermediate_size // self.tp + 2 * e)
        params = self.stage_layers[stage_idx] * layer
        embed = s.vocab_size * e / (self.tp if self.vocab_parallel else 1)
        if stage_idx == 0:
            params += embed
        if self._is_last(stage_idx):
            params += e + (0 if s.tie_word_embeddings and self.pp == 1 else embed)
        return params

    def static_bytes(self, stage_idx: int = 0) -> float:
        """bf16 weights + float32 grads + float32 master/Adam moments (see module docstring)."""
        optimizer = 12 / (self.dp if self.distributed_optimizer else 1)
        return self.stage_params(stage_idx) * (2 + 4 + optimizer)

    def grad_bytes(self, stage_idx: int = 0) -> float:
        """The float32 gradients in :meth:`static_bytes`: Megatron allocates them with the
        model; chunkflow as its first backward produces them (torch's ``.grad``, FSDP2's
        unsharded accumulators), so a peak before any backward does not hold them."""
        return self.stage_params(stage_idx) * 4

    def optimizer_step_bytes(self, stage_idx: int = 0) -> float:
        """chunkflow's optimizer step, on top of :meth:`static_bytes`: AdamW's foreach
        temporaries, one float32 tensor the size of the parameters it updates (FSDP2: its
        shard)."""
        return self.grad_bytes(stage_idx) / (self.dp if self.distributed_optimizer else 1)
