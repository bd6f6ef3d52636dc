"""Model configuration with Hugging Face field names, and presets.

Field names follow ``transformers``' ``LlamaConfig``/``Qwen2Config``/``Qwen3Config``/
``MistralConfig`` so a checkpoint's ``config.json`` maps onto :class:`ModelConfig` without
renaming; what differs between the families is :mod:`chunkflow.models.families`' table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chunkflow.models.families import ROPE_TYPES, get_family
from chunkflow.plan.cost import MODEL_SHAPES


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    """Number of token ids; valid ids are 0..vocab_size-1."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int | None = None
    """Key/value heads (GQA); defaults to ``num_attention_heads`` (plain multi-head attention)."""
    head_dim: int | None = None
    """Per-head width; defaults to ``hidden_size // num_attention_heads``."""
    model_type: str = "llama"
    """A family of :data:`chunkflow.models.families.FAMILIES`: "llama", "qwen2" (always q/k/v
    biases), "qwen3" (per-head q/k norms) or "mistral"."""
    attention_bias: bool = False
    """Llama's and Qwen3's flag: biases on q/k/v/o projections."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    """A static RoPE variant's parameters as sorted (name, value) pairs (a dict is accepted):
    e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``; empty for plain RoPE. See
    :mod:`chunkflow.models.rope`."""
    max_position_embeddings: int = 32768
    """Informational: RoPE itself extrapolates; chunkflow never truncates to this length."""
    tie_word_embeddings: bool = False
    """Share the input embedding matrix with the output head."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        get_family(self.model_type, source="ModelConfig.model_type")
        scaling = self.rope_scaling
        if isinstance(scaling, dict):
            scaling = tuple(sorted(scaling.items()))
            object.__setattr__(self, "rope_scaling", scaling)
        rope_type = dict(scaling).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope_scaling rope_type={rope_type!r}: supported are "
                             f"{', '.join(ROPE_TYPES)}")

    @property
    def family(self):
        return get_family(self.model_type)

    @property
    def rope_parameters(self) -> dict:
        """The RoPE variant's parameters (``{"rope_type": "default"}`` for plain RoPE)."""
        return dict(self.rope_scaling) or {"rope_type": "default"}

    @property
    def qkv_bias(self) -> bool:
        return self.family.has_qkv_bias(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return self.family.has_o_bias(self.attention_bias)

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        layer = attn + 3 * h * self.intermediate_size + 2 * h + 2 * d * self.qk_norm
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + h

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _qwen2(hidden, inter, layers, heads, kv, *, vocab=152064, tied=False, eps=1e-6):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, model_type="qwen2", rms_norm_eps=eps,
                       rope_theta=1_000_000.0, max_position_embeddings=32768,
                       tie_word_embeddings=tied)


def _qwen25(name: str, *, eps: float) -> ModelConfig:
    """A published Qwen2.5 config: its shape from the planner's table
    (:data:`chunkflow.plan.cost.MODEL_SHAPES`), plus what training needs besides."""
    s = MODEL_SHAPES[name]
    return _qwen2(s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads,
                  s.num_key_value_heads, vocab=s.vocab_size, tied=s.tie_word_embeddings, eps=eps)


PRESETS: dict[str, ModelConfig] = {
    # Small enough to train on a laptop CPU in the demo; byte-level vocabulary.
    "tiny": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        rope_theta=10000.0, tie_word_embeddings=False),
    # Shapes of the published Qwen2.5 configs, for planning and cost models.
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, vocab=151936, tied=True),
    "qwen2.5-7b": _qwen25("qwen2.5-7b", eps=1e-6),
    "qwen2.5-14b": _qwen25("qwen2.5-14b", eps=1e-5),
    "qwen2.5-32b": _qwen25("qwen2.5-32b", eps=1e-5),
    "qwen2.5-72b": _qwen25("qwen2.5-72b", eps=1e-5),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
