"""Hugging Face ``transformers`` causal LMs under ChunkFlow, without forking their code.

``HFChunkModel(model)`` gives a transformers model (or a PEFT wrapper of one) the interface the
engine runs: ``hidden_states(input_ids, position_ids=..., attention=...)``, ``lm_head``,
``config`` and ``parameters()``. It works through the library's own extension points:

* ``AttentionInterface``: we register an attention function named ``"chunkflow"``. The model's
  attention modules call it with their post-RoPE queries and un-expanded key/value heads; it
  hands them to the engine's per-chunk attention (which stores the chunk's keys/values as chain
  state, attends to the chain's earlier state and lets gradients flow back into it).
* ``AttentionMaskInterface``: the ``"chunkflow"`` mask is ``None``: the engine's attention knows
  each chunk's segments and is causal by construction, so no dense mask is ever built.
* ``position_ids``: passed straight to the model, so RoPE continues along a chain and restarts
  for each packed sequence.

The per-chunk attention object travels as a keyword argument of the forward call (transformers
passes extra keyword arguments down to the attention function), not as global state. The
model's ``config._attn_implementation`` is switched to ``"chunkflow"`` only for the duration of
a chunk's forward and restored afterwards, so the same model called directly, and every other
model in the process, behaves exactly as before.

Only architectures whose attention is plain causal softmax attention over all earlier tokens are
accepted (the families of :mod:`chunkflow.models.families`: Llama, Qwen2, Qwen3, Mistral without
sliding window, Qwen3-MoE, Mixtral, OLMo-2, Granite, Phi-3); anything else is refused at
construction with the reason, rather than trained with wrong gradients. Granite's logits are
divided by ``logits_scaling``: the last stage's hidden states are, before the head and loss.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chunkflow.models.families import FAMILIES, ROPE_TYPES

ATTN_NAME = "chunkflow"
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

_registered = False

DECODER_FORWARD = "chunkflow_decoder_forward"
"""An entry point the causal LM may carry that runs its decoder; :class:`HFChunkModel` calls it
instead of the decoder when present (:meth:`chunkflow.models.adapter.TransformersAdapter.
fsdp_root_forward` sets it)."""


def is_hf_model(model: Any) -> bool:
    """A transformers model (subclasses included) or a PEFT wrapper of one. A model of either
    library means the library is imported already, so this never imports them itself."""
    transformers, peft = sys.modules.get("transformers"), sys.modules.get("peft")
    return ((transformers is not None and isinstance(model, transformers.PreTrainedModel))
            or (peft is not None and isinstance(model, peft.PeftModel)))


def check_hf_model(model: Any, *, what: str, valid: str) -> None:
    """Refuse, naming ``what`` and what is ``valid``, anything but a transformers model (or a
    PEFT wrapper of one) where chunkflow's reference model is not given either."""
    if not is_hf_model(model):
        raise ValueError(f"{what} runs chunkflow's reference model or a transformers causal LM, "
                         f"got {type(model).__name__}; valid: {valid}")


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask, *, scaling: float | None = None, dropout: float = 0.0,
               chunkflow_attention=None, **kwargs):
    """AttentionInterface entry: (B, H, L, D) queries, (B, G, L, D) keys/values, post-RoPE.

    Returns (attn_output (B, L, H, D), None) as transformers expects.
    """
    if chunkflow_attention is None:
        raise RuntimeError("the 'chunkflow' attention runs only inside ChunkFlowEngine; call the "
                           "model directly for ordinary forward passes")
    if dropout:
        raise ValueError(f"attention dropout {dropout} makes gradients random; chunkflow "
                         f"trains attention without dropout (set config.attention_dropout=0)")
    # (1, H, L, D); the module's score scale (Granite's attention_multiplier, else 1/sqrt(D))
    out = chunkflow_attention(module.layer_idx, query, key, value, scale=scaling)
    return out.transpose(1, 2), None


def _no_mask(*args, **kwargs):
    """AttentionMaskInterface entry: the chunkflow attention needs no mask."""
    return None


def register() -> None:
    """Register the "chunkflow" attention and mask with transformers (idempotent).

    Registration adds a new name only; models that do not select it are unaffected.
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    _registered = True


def unsupported_reason(config) -> str | None:
    """Why a model with this transformers config cannot be trained exactly (every reason, most
    specific first), or None."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not causal LMs over one sequence"
    reasons = []
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, name, None):
            reasons.append(f"{name}={getattr(config, name)}: logit soft-capping is not "
                           f"supported (chunkflow's attention kernels compute plain softmax "
                           f"attention)")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        reasons.append(f"layer_types {sorted(set(layer_types))}: only full causal attention is "
                       f"exact under chunking (sliding-window or linear-attention layers are not)")
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None)
    if window is not None and uses_window:
        reasons.append(f"sliding_window={window}: sliding-window attention is not supported "
                       f"(set sliding_window=None for full attention)")
    if getattr(config, "attention_dropout", 0.0):
        reasons.append(f"attention_dropout={config.attention_dropout}: dropout makes gradients "
                       f"random; set it to 0")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) \
        else "default"
    if rope_type not in ROPE_TYPES:
        reasons.append(f"rope_type {rope_type!r}: only the static RoPE types "
                       f"({', '.join(ROPE_TYPES)}) are exact under chunking; others (dynamic, "
                       f"longrope) change the frequencies with each forward's length")
    if getattr(config, "output_router_logits", False):
        reasons.append("output_router_logits=True: the router's auxiliary load-balancing loss "
                       "is not computed under chunkflow (the engine trains the language-model "
                       "loss only); set it to False to train without it")
    if model_type not in SUPPORTED_MODEL_TYPES:
        reasons.append(f"model_type {model_type!r} is not supported yet; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}. Other architectures may use "
                       f"attention that chunking would change (sliding windows, soft-capping, "
                       f"linear or recurrent layers), so they are refused rather than trained "
                       f"with wrong gradients")
    return "; ".join(reasons) or None


def check_model_dir(path: str, *, option: str = "--model.path", weights: bool = True) -> Path:
    """``path`` as a local Hugging Face model directory (config.json and safetensors weights;
    config.json only with ``weights=False``, for planning), or a ValueError saying what is
    missing. Nothing is looked up on the network."""
    where = Path(path)
    valid = "valid: a local directory with config.json and safetensors weights"
    if not where.exists():
        raise ValueError(f"{option}={path!r} does not exist; {valid} (chunkflow never "
                         f"downloads models: fetch it first, e.g. with huggingface-cli download)")
    if not where.is_dir():
        raise ValueError(f"{option}={path!r} is a file, not a directory; {valid}")
    if not (where / "config.json").is_file():
        raise ValueError(f"{option}={path!r} has no config.json; {valid}")
    if weights and not any(where.glob("*.safetensors")) \
            and not any(where.glob("*.safetensors.index.json")):
        pickles = sorted(p.name for p in where.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        found = f"only pickle weights ({', '.join(pickles)}), which can run code on load" \
            if pickles else "no *.safetensors weights"
        raise ValueError(f"{option}={path!r} has {found}; {valid} (convert once with "
                         f"transformers: from_pretrained(...).save_pretrained(...))")
    return where


def load_hf_model(path: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A local transformers causal LM directory, loaded as is (no network), checked to be
    trainable with chunkflow before its weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # OSError, ValueError, KeyError, ... from transformers
        raise ValueError(f"--model.path={path!r}: config.json is not a transformers model "
                         f"config ({type(e).__name__}: {e})") from None
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(f"--model.path={path!r} ({type(config).__name__}) cannot be trained "
                         f"with chunkflow: {reason}")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # chunkflow prints its own line about the model
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                     attn_implementation="sdpa")
    except Exception as e:  # OSError, ValueError, KeyError, ... from transformers
        raise ValueError(f"--model.path={path!r}: cannot load a transformers causal LM "
                         f"({type(e).__name__}: {e}); valid: a local directory with "
                         f"config.json and safetensors weights") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    HFChunkModel(model)  # refuse unsupported architectures before any work is done
    return model.to(device)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside ``model`` (unwrapping PEFT)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class HFChunkModel:
    """The engine's view of a transformers causal LM: decoder, head, config, parameters."""

    def __init__(self, model: nn.Module):
        causal_lm = _causal_lm(model)
        config = getattr(causal_lm, "config", None)
        reason = None if config is not None else "it has no config"
        reason = reason or unsupported_reason(config)
        if reason is None and not hasattr(causal_lm, "get_decoder"):
            reason = "it is not a *ForCausalLM model (no get_decoder())"
        if reason is not None:
            raise ValueError(f"{type(causal_lm).__name__} cannot be trained with chunkflow: "
                             f"{reason}")
        register()
        self.module, self.config = model, config
        self.decoder = causal_lm.get_decoder()
        self.lm_head = causal_lm.get_output_embeddings()
        # a pipeline stage holds some of the layers, under their own indices
        self.layer_ids = tuple(layer.self_attn.layer_idx for layer in self.decoder.layers)
        self._warned_eval = False
        self._scoped = False

    def parameters(self):
        return self.module.parameters()

    def input_embedding(self) -> nn.Module | None:
        """The token embedding (None on a later pipeline stage)."""
        return self.module.get_input_embeddings()

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers this model (or pipeline stage) holds."""
        return list(self.decoder.layers)

    def step_scope(self):
        """The context a step's actions run in: the model's layers call chunkflow's attention,
        in forwards and in the backwards where activation checkpointing recomputes them. Set
        once a step, not per chunk (setting a transformers config's attribute runs its Python
        ``__setattr__``: host time a small model's chunk feels); the model's own setting is
        back after it."""
        return self._chunkflow_attention()

    @contextlib.contextmanager
    def _chunkflow_attention(self):
        if self._scoped:  # inside the step's scope already
            yield
            return
        previous = self.config._attn_implementation
        self.config._attn_implementation = ATTN_NAME
        self._scoped = True
        try:
            yield
        finally:
            self._scoped = False
            self.config._attn_implementation = previous

    def enable_activation_checkpointing(self) -> None:
        """Per-layer activation checkpointing, through transformers' own switch
        (non-reentrant; chunkflow's attention stays exact under either kind)."""
        causal_lm, kwargs = _causal_lm(self.module), {"use_reentrant": False}
        if hasattr(causal_lm, "activation_checkpointing_enable"):  # transformers >= 5
            causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor,
                      attention, activation_checkpointing: bool = False) -> torch.Tensor:
        """(1, L) ids and positions -> (1, L, hidden) final hidden states (after the norm).
        Under sequence parallelism the hidden states are this rank's rows of the chunk, and
        so are the ids unless the embedding is vocabulary-parallel (it takes the whole padded
        chunk's); the positions are the whole padded chunk's, which attention runs over.
        ``activation_checkpointing`` is transformers' business here (see
        :meth:`enable_activation_checkpointing`); transformers checkpoints only in training
        mode, so it warns once when asked to in eval mode."""
        if activation_checkpointing and torch.is_grad_enabled() and not self.module.training \
                and not self._warned_eval:
            self._warned_eval = True
            warnings.warn("activation checkpointing is on but the transformers model is in "
                          "eval mode, where transformers does not checkpoint; call "
                          "model.train()", stacklevel=3)
        # A later pipeline stage gets the previous stage's hidden states (1, L, E).
        inputs = ({"inputs_embeds": input_ids} if input_ids.is_floating_point()
                  else {"input_ids": input_ids})
        # the decoder, or the entry its adapter gave the causal LM (a root forward method)
        decoder = getattr(_causal_lm(self.module), DECODER_FORWARD, self.decoder)
        with self._chunkflow_attention():
            out = decoder(**inputs, position_ids=position_ids, use_cache=False,
                          chunkflow_attention=attention)
        hidden = out.last_hidden_state
        scaling = getattr(self.config, "logits_scaling", None)
        if self.lm_head is not None and scaling not in (None, 1.0):
            # Granite: logits = head(hidden) / logits_scaling; the same as the head of
            # hidden / logits_scaling (no head bias), which the fused loss reads
            hidden = hidden / scaling
        return hidden
