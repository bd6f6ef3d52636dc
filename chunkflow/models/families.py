"""What each supported model family needs, in one table.

Read by the reference model (:mod:`chunkflow.models.config`, :mod:`chunkflow.models.transformer`),
the Hugging Face checkpoint reader and writer (:mod:`chunkflow.models.hf_checkpoint`), the
transformers adapter (:mod:`chunkflow.models.hf`), the model adapters that the parallel layer
asks (:mod:`chunkflow.models.adapter`) and the cost model (through :func:`model_shape`), so
they agree on what a family is.

Every family here is a pre-norm decoder with SwiGLU MLP, RMSNorm, full causal softmax attention
and RoPE; they differ in the rows below. RoPE variants (:mod:`chunkflow.models.rope`) are a
config field, not a family trait: any family may carry a static one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    architecture: str
    """The transformers ``*ForCausalLM`` class name, written into ``config.json``."""
    qkv_bias: str
    """q/k/v projection biases: "always" (Qwen2, no flag), "flag" (``attention_bias``) or
    "never"."""
    o_bias: str
    """o_proj bias: "flag" (``attention_bias`` covers it too) or "never"."""
    qk_norm: bool
    """RMSNorm over each head's query and key before RoPE (Qwen3)."""
    max_position_embeddings: int
    """The transformers config class's default, for a config.json that leaves it out."""
    head_dim: int | None = None
    """The config class's default head width (None: hidden_size // num_attention_heads)."""
    sliding_window: int | None = None
    """For a family that applies a window whenever one is set (no ``use_sliding_window``
    switch): its config class's default, refused unless a config sets it to null."""
    reference: bool = True
    """chunkflow's reference model implements it (``--model.implementation=reference``, its
    checkpoints load into it); otherwise only the transformers model trains (``hf``)."""
    parallel: bool = True
    """chunkflow's tensor-parallel plan (q/k/v, o, gate/up, down projections by these names)
    and pipeline split apply to the transformers model; otherwise data parallel only."""
    experts: bool = False
    """Mixture of experts: a replica may route no token to an expert, whose weights then get no
    gradient that step (data parallelism sums gradients itself, zeros for those)."""
    note: str = ""
    """What a user should know (e.g. what is not computed)."""
    fixed_config: tuple[tuple[str, object], ...] = ()
    """config.json entries the reference model's checkpoints write as it computes (no MLP bias,
    no sliding window), whatever the config class's defaults."""

    def has_qkv_bias(self, attention_bias: bool) -> bool:
        return self.qkv_bias == "always" or (self.qkv_bias == "flag" and attention_bias)

    def has_o_bias(self, attention_bias: bool) -> bool:
        return self.o_bias == "flag" and attention_bias


_MOE = ("mixture of experts: each token's routing is its own, so chunking is exact; trained "
        "without the router's auxiliary load-balancing loss (output_router_logits=true is "
        "refused, since that loss would be dropped); the cost model prices it as dense")

_NO_WINDOW = (("use_sliding_window", False), ("sliding_window", None))

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", qkv_bias="flag", o_bias="flag", qk_norm=False,
                    max_position_embeddings=2048, fixed_config=(("mlp_bias", False),)),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias="always", o_bias="never", qk_norm=False,
                    max_position_embeddings=32768, fixed_config=_NO_WINDOW),
    "qwen3": Family("Qwen3ForCausalLM", qkv_bias="flag", o_bias="flag", qk_norm=True,
                    max_position_embeddings=32768, head_dim=128, fixed_config=_NO_WINDOW),
    "mistral": Family("MistralForCausalLM", qkv_bias="never", o_bias="never", qk_norm=False,
                      max_position_embeddings=4096 * 32, sliding_window=4096,
                      fixed_config=_NO_WINDOW),
    # transformers-only families: their attention goes through AttentionInterface unchanged
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qkv_bias="flag", o_bias="flag", qk_norm=True,
                        max_position_embeddings=32768, reference=False, parallel=False,
                        experts=True, note=_MOE),
    "mixtral": Family("MixtralForCausalLM", qkv_bias="never", o_bias="never", qk_norm=False,
                      max_position_embeddings=4096 * 32, reference=False, parallel=False,
                      experts=True, note=_MOE),
    "olmo2": Family("Olmo2ForCausalLM", qkv_bias="flag", o_bias="flag", qk_norm=True,
                    max_position_embeddings=2048, reference=False, parallel=False,
                    note="q/k norms over the whole projection, across heads: no TP plan yet"),
    "granite": Family("GraniteForCausalLM", qkv_bias="flag", o_bias="flag", qk_norm=False,
                      max_position_embeddings=2048, reference=False, parallel=False,
                      note="its multipliers (attention_multiplier as the attention scale, "
                           "embedding_multiplier, residual_multiplier, logits_scaling) are "
                           "applied as transformers applies them; no TP plan or pipeline split "
                           "yet (a later stage's input embeddings would be scaled again)"),
    "phi3": Family("Phi3ForCausalLM", qkv_bias="never", o_bias="never", qk_norm=False,
                   max_position_embeddings=4096, reference=False, parallel=False,
                   note="fused qkv_proj and gate_up_proj: no TP plan yet; sliding_window and "
                        "longrope (the 128K variants) are refused"),
}

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""Static RoPE variants: the frequencies depend on the config only, never on a forward's length,
so chunking cannot change them ("dynamic" NTK does, and is refused)."""


REFERENCE_FAMILIES = {name: f for name, f in FAMILIES.items() if f.reference}
"""The families chunkflow's reference model implements."""


def get_family(model_type: str | None, *, source: str = "model_type") -> Family:
    """A family of the reference model."""
    try:
        return REFERENCE_FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"{source}={model_type!r}: supported families are "
                         f"{', '.join(map(repr, REFERENCE_FAMILIES))}") from None


def family_of(config) -> Family | None:
    """The table's row of a chunkflow or transformers config (None: not a family here)."""
    return FAMILIES.get(getattr(config, "model_type", None))


def model_shape(config):
    """The cost model's :class:`~chunkflow.plan.cost.ModelShape` of a chunkflow or
    transformers config, with the family's q/k/v biases from this table."""
    from chunkflow.plan.cost import ModelShape

    family = family_of(config)
    qkv_bias = getattr(config, "qkv_bias", None)
    if qkv_bias is None and family is not None:
        qkv_bias = family.has_qkv_bias(bool(getattr(config, "attention_bias", False)))
    return ModelShape.from_config(config, qkv_bias=qkv_bias)
