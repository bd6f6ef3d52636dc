"""What a training configuration builds: the tokenizer, the model (LoRA-wrapped when asked) and,
for planning, the model's shape. Nothing here touches the network: ``--model.path`` must be a
local model directory (checked before transformers sees it)."""

from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from chunkflow.train.config import TrainConfig
from chunkflow.train.data.tokenizer import load_tokenizer


def tokenizer_spec(config: TrainConfig) -> str:
    """``--data.tokenizer``, with 'auto' resolved: the model directory's tokenizer, else byte."""
    if config.data.tokenizer != "auto":
        return config.data.tokenizer
    return config.model.path or "byte"


def build_tokenizer(config: TrainConfig):
    if config.model.path is not None and config.data.tokenizer == "auto":
        from chunkflow.models.hf import check_model_dir

        check_model_dir(config.model.path)
    return load_tokenizer(tokenizer_spec(config))


def model_label(config: TrainConfig) -> str:
    """How runs and plans name the model: the preset, or the directory and implementation."""
    if config.model.path is None:
        return config.model.preset
    return f"{config.model.path} ({config.model.implementation})"


def describe_dtypes(config: TrainConfig) -> str:
    """What is held in which dtype, for banners: e.g. "bfloat16 weights (config.json), float32
    master weights", "bfloat16 frozen base (config.json), float32 adapters"."""
    weights, source = config.model.weights_dtype(), config.model.dtype_source()
    if config.model.path is None and config.model.dtype == "auto":
        return weights  # a preset's default: nothing to explain
    if config.lora.rank:
        return f"{weights} frozen base ({source}), float32 adapters" if weights == "bfloat16" \
            else f"{weights} ({source})"
    param = config.param_dtype()
    if param != weights:
        return f"{weights} weights ({source}), {param} master weights"
    return f"{weights} ({source})"


def check_dtypes(config: TrainConfig, *, autocast: bool) -> None:
    """Refuse what cannot run: LoRA's ``modules_to_save`` train in float32 beside a bfloat16
    base, a mix that only autocast computes (a float32 embedding's output cannot enter a
    bfloat16 linear layer)."""
    if (config.lora.rank and config.lora.modules_to_save and not autocast
            and config.model.weights_dtype() == "bfloat16"):
        raise ValueError(f"--lora.modules_to_save={config.lora.modules_to_save!r} on a bfloat16 "
                         f"base ({config.model.dtype_source()}): those modules train in float32, "
                         f"and the mix runs only under bf16 autocast; valid: "
                         f"--train.autocast=bf16 (the default on CUDA), or --model.dtype=float32")


def _check_lora(config: TrainConfig) -> None:
    if config.lora.rank == 0:
        return
    if config.model.path is None:
        raise ValueError(f"--lora.rank={config.lora.rank} adapts a pretrained model: set "
                         f"--model.path to a local Hugging Face model directory (a preset is "
                         f"randomly initialised, so train it fully with --lora.rank=0)")
    if config.model.implementation != "hf":
        raise ValueError(f"--lora.rank={config.lora.rank} with --model.implementation=reference: "
                         f"LoRA runs through peft on the transformers model; valid: "
                         f"--model.implementation=hf")


def build_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """The model to train, in training mode: a preset initialised from the seed, or
    model.path's weights (as is, or in chunkflow's reference model), LoRA-wrapped with
    ``--lora.rank > 0``."""
    dtype = getattr(torch, config.param_dtype())
    torch.manual_seed(config.train.seed)
    _check_lora(config)
    if config.model.path is None:
        from chunkflow.models import Transformer

        return Transformer(config.model.model_config()).to(device=device, dtype=dtype).train()
    if config.model.vocab_size is not None:
        raise ValueError("--model.vocab_size applies to presets; a --model.path checkpoint has "
                         "its own vocabulary")
    if config.model.implementation == "reference":
        from chunkflow.models.hf import check_model_dir
        from chunkflow.models.hf_checkpoint import load_hf_checkpoint

        check_model_dir(config.model.path)
        return load_hf_checkpoint(config.model.path, dtype=dtype, device=device).train()
    from chunkflow.models.hf import load_hf_model

    model = load_hf_model(config.model.path, dtype=dtype, device=device)
    if config.lora.rank > 0:
        from chunkflow.train.lora import apply_lora

        model = apply_lora(model, config.lora, model_path=config.model.path)
        train_in_float32(model)
    return model.train()


def build_meta_model(cfg: TrainConfig, layers: int | None = None) -> nn.Module:
    """The configured model on the meta device, shapes and dtypes only (with ``layers``
    decoder layers instead of its own, when given); build it outside a fake mode."""
    with torch.device("meta"):
        return _meta_model(cfg, layers)


def _meta_model(cfg: TrainConfig, layers: int | None) -> nn.Module:
    dtype = getattr(torch, cfg.param_dtype())
    _check_lora(cfg)
    if cfg.model.path is None:
        from chunkflow.models import Transformer

        config = cfg.model.model_config()
        if layers is not None:
            config = dataclasses.replace(config, num_hidden_layers=layers)
        return Transformer(config).to(dtype=dtype)
    from chunkflow.models.hf import check_model_dir

    path = check_model_dir(cfg.model.path, weights=False)
    if cfg.model.implementation == "reference":
        from chunkflow.models import Transformer
        from chunkflow.models.hf_checkpoint import CONFIG_NAME, config_from_hf

        config = config_from_hf(json.loads((path / CONFIG_NAME).read_text()),
                                source=str(path / CONFIG_NAME))
        if layers is not None:
            config = dataclasses.replace(config, num_hidden_layers=layers)
        return Transformer(config).to(dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    from chunkflow.models.hf import HFChunkModel, unsupported_reason

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # OSError, ValueError, KeyError, ... from transformers
        raise ValueError(f"--model.path={cfg.model.path!r}: config.json is not a transformers "
                         f"model config ({type(e).__name__}: {e})") from None
    if layers is not None:
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:1] * layers
        config.num_hidden_layers = layers
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(f"--model.path={cfg.model.path!r} ({type(config).__name__}) cannot be "
                         f"trained with chunkflow: {reason}")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    HFChunkModel(model)
    if cfg.lora.rank > 0:
        from chunkflow.train.lora import apply_lora

        model = apply_lora(model, cfg.lora, model_path=cfg.model.path)
    return model


def train_in_float32(model: nn.Module) -> None:
    """LoRA on a 16-bit base: the trained parameters (peft's adapters already are, and
    ``modules_to_save``' copies) in float32, so that small updates are not rounded away."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def configured_shape(config: TrainConfig):
    """The cost and memory models' view of the configured model
    (:class:`chunkflow.plan.cost.ModelShape`): a preset's, or model.path's config.json (any
    family chunkflow trains)."""
    from chunkflow.models.families import model_shape as shape_of

    if config.model.path is None:
        return shape_of(config.model.model_config())
    from transformers import AutoConfig

    from chunkflow.models.hf import check_model_dir

    check_model_dir(config.model.path, weights=False)
    try:
        hf = AutoConfig.from_pretrained(config.model.path, local_files_only=True)
    except Exception as e:  # OSError, ValueError, KeyError, ... from transformers
        raise ValueError(f"--model.path={config.model.path!r}: config.json is not a "
                         f"transformers model config ({type(e).__name__}: {e})") from None
    return shape_of(hf.get_text_config())


def trainable_params(config: TrainConfig) -> int | None:
    """LoRA's trained parameters (its adapters and ``modules_to_save``), counted on the model
    built on the meta device (no weights read), for the memory model's
    ``trainable_params``; ``None`` without LoRA (every parameter trains)."""
    if config.lora.rank == 0:
        return None
    params = {id(p): p for p in build_meta_model(config).parameters() if p.requires_grad}
    return sum(p.numel() for p in params.values())
