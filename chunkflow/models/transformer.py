"""Reference Llama/Qwen2-family decoder with Hugging Face parameter names.

RMSNorm, RoPE (rotate-half convention, cos/sin computed in float32 as ``transformers`` does),
grouped-query attention, SwiGLU MLP, optional q/k/v bias, optional tied embeddings. State-dict keys
match ``LlamaForCausalLM``/``Qwen2ForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``, ...).

``Transformer(config)(input_ids)`` is ordinary unchunked causal-LM training. For chunked execution
the runtime passes ``position_ids`` and an ``attention`` callable ``(layer_idx, q, k, v) -> out``
that owns everything about chunk boundaries and carried key/value state: the model itself keeps no
cache and knows nothing about chunks.

Shape legend: B batch, S sequence (chunk) length, H query heads, G key/value heads, D head dim,
E hidden size, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from chunkflow.models.config import ModelConfig
from chunkflow.models.rope import rope_frequencies

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (or wider), as transformers does, then cast back.
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.scale = rope_frequencies(
            config.head_dim, config.rope_theta, config.rope_parameters,
            max_position_embeddings=config.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must not round the RoPE frequencies (bf16 inv_freq moves
        # cos/sin by up to ~1.5 at positions of a few thousand): keep float32, follow the device.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # position_ids (B, S) -> cos, sin (B, 1, S, D), computed in float32 like transformers.
        freqs = position_ids[:, :, None].float() * self.inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scale, emb.sin() * self.scale  # yarn's attention factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        e = config.hidden_size
        self.q_proj = nn.Linear(e, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(e, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(e, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, e, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's query and key, before RoPE
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, cos, sin, attention: Optional[AttentionFn]) -> torch.Tensor:
        B, S, _ = x.shape
        # (B, S, E) -> (B, heads, S, D); under tensor parallelism, this rank's heads
        q = self.q_proj(x).view(B, S, -1, self.head_dim)
        k = self.k_proj(x).view(B, S, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attention is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = attention(self.layer_idx, q, k, v)
        # (B, H, S, D) -> (B, S, H*D)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(e, i, bias=False)
        self.up_proj = nn.Linear(e, i, bias=False)
        self.down_proj = nn.Linear(i, e, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attention: Optional[AttentionFn]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """The body (``model.*`` in HF names). Layers live in a ModuleDict keyed "0", "1", ... so a
    pipeline stage can be built by deleting the layers it does not own (torchtitan's approach)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(config, i) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(nn.Module):
    """Causal LM: ``Transformer(config)(input_ids)`` -> logits (B, S, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def input_embedding(self) -> nn.Module | None:
        """The token embedding (None on a later pipeline stage)."""
        return self.model.embed_tokens

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers this model (or pipeline stage) holds."""
        return list(self.model.layers.values())

    @property
    def layer_ids(self) -> tuple[int, ...]:
        """Indices of the decoder layers this model (or pipeline stage) holds."""
        return tuple(int(i) for i in self.model.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: Optional[torch.Tensor] = None,
        attention: Optional[AttentionFn] = None,
    ) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, V). Without ``attention``: plain causal attention."""
        return self.lm_head(self.hidden_states(input_ids, position_ids=position_ids,
                                               attention=attention))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: Optional[torch.Tensor] = None,
        attention: Optional[AttentionFn] = None,
        activation_checkpointing: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, S) -> final-norm hidden states (B, S, E), before the output head.

        A pipeline stage is this model with the modules of other stages removed (set to None, or
        deleted from ``model.layers``): without ``embed_tokens`` the input is the previous
        stage's hidden states (B, S, E); without ``norm`` the output is the last layer's.
        ``activation_checkpointing`` per decoder layer (non-reentrant): only each layer's input
        is kept, the rest is recomputed in backward.
        """
        B, S = input_ids.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        embed = self.model.embed_tokens
        x = embed(input_ids) if embed is not None else input_ids
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        recompute_layers = activation_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers.values():
            if recompute_layers:
                x = checkpoint(layer, x, cos, sin, attention, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attention)
        return self.model.norm(x) if self.model.norm is not None else x
