"""RoPE frequencies of the static variants: default, linear, llama3 (Llama 3.1+) and yarn.

``rope_frequencies(head_dim, theta, params, max_position_embeddings)`` returns the inverse
frequencies (float32, ``head_dim / 2``) and the factor cos/sin are scaled by, with the formulas
of the papers as transformers implements them (``modeling_rope_utils``); the tests compare the
reference model's logits with transformers' for each variant. ``params`` is the config's
``rope_parameters`` / ``rope_scaling`` dict without ``rope_theta``.
"""

from __future__ import annotations

import math

import torch


def _default(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth ramp between
    (in wavelengths relative to the pre-training context)."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    context = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return torch.where(medium, smoothed, scaled)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, p: dict, max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by ``factor``, extrapolate the high ones, a linear
    ramp between (by rotations over the pre-training context); cos/sin scaled by the
    attention factor."""
    context = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / context
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = (_mscale(factor, mscale) / _mscale(factor, mscale_all)
                            if mscale and mscale_all else _mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation = 1 - ramp
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation)
                + (1.0 / pos_freqs) * extrapolation)
    return inv_freq, float(attention_factor)


def rope_frequencies(head_dim: int, theta: float, params: dict, *,
                     max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,), cos/sin scale) of a RoPE variant."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return _default(head_dim, theta), 1.0
    if rope_type == "linear":
        return _default(head_dim, theta) / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(_default(head_dim, theta), params), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, params, max_position_embeddings)
    raise ValueError(f"rope_type={rope_type!r}: supported are default, linear, llama3, yarn")


REQUIRED = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",)}
"""Fields each variant needs (yarn's ``factor`` may come from the context ratio)."""
