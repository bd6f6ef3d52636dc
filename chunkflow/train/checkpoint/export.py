"""What a checkpoint holds of the model: a Hugging Face model directory of its own.

``ModelFiles(model, tokenizer, model_path=...)`` writes, into a checkpoint directory:

* full fine-tuning: ``model.safetensors`` (shared tensors such as tied embeddings once) and
  ``config.json`` in Hugging Face format, so ``AutoModelForCausalLM.from_pretrained(step_dir)``
  loads the trained model;
* LoRA: the adapter in PEFT's format (``adapter_model.safetensors``, ``adapter_config.json``,
  whose base is the absolute ``--model.path``); with ``merged=True`` also ``merged/``, a full
  model directory of base + adapter;
* the weights in the model's dtype (``dtype``: ``--model.dtype``, by default config.json's),
  whatever dtype they trained in (float32 master weights, float32 LoRA adapters stay float32);
* always, next to the weights: the tokenizer (its files and chat template, so
  ``AutoTokenizer.from_pretrained(step_dir)`` and ``apply_chat_template`` work; a byte-level run
  writes the byte tokenizer in Hugging Face form) and ``generation_config.json`` (the source
  model's, or one naming the tokenizer's end-of-sequence token).

Distributed runs write the weights per stage (:mod:`chunkflow.train.checkpoint.store`) and the rest
with :meth:`ModelFiles.write_metadata`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

GENERATION_CONFIG = "generation_config.json"
MERGED_DIR = "merged"


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def hf_config_json(model: nn.Module, dtype: torch.dtype) -> str:
    """config.json in Hugging Face's format for ``model`` (chunkflow's reference model or a
    transformers model; a PEFT model's base) whose weights are saved in ``dtype``."""
    from chunkflow.models.config import ModelConfig
    from chunkflow.models.hf_checkpoint import config_to_hf

    if is_lora(model):
        model = model.get_base_model()
    config = model.config
    name = str(dtype).removeprefix("torch.")
    if isinstance(config, ModelConfig):
        return json.dumps(config_to_hf(config, dtype=name), indent=2)
    data = json.loads(config.to_json_string())  # transformers >= 4.56 says dtype, before torch_dtype
    data["torch_dtype" if "torch_dtype" in data else "dtype"] = name
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each shared tensor (tied embeddings) under its first name only."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


class ModelFiles:
    """Writes and reads the model part of a checkpoint (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, *, model_path: str | None,
                 dtype: torch.dtype | None = None):
        """``dtype``: the dtype weights are saved in (default: the model's first
        parameter's)."""
        self.model, self.tokenizer, self.model_path = model, tokenizer, model_path
        self.lora = is_lora(model)
        self.dtype = dtype or next(model.parameters()).dtype
        # Full fine-tuning that holds weights wider than it saves them keeps them as held too.
        self.masters = not self.lora and any(
            p.dtype != self.dtype for p in model.parameters() if p.is_floating_point())

    def cast(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Floating-point tensors of ``state`` in the saved dtype."""
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}

    def write(self, path: Path, *, merged: bool = False) -> None:
        """Everything of one process's model into checkpoint directory ``path``."""
        from safetensors.torch import save_file

        if self.lora:
            from chunkflow.train.lora import save_adapter

            save_adapter(self.model, path)
        else:
            state = self.cast(_unique(self.model.state_dict()))
            save_file({k: v.detach().contiguous() for k, v in state.items()},
                      str(path / "model.safetensors"), metadata={"format": "pt"})
        self.write_extras(path, merged=merged)

    def write_extras(self, path: Path, *, merged: bool = False, num_stages: int = 1) -> None:
        """All but the weights (or adapter): config.json and generation_config.json next to
        full weights, the tokenizer, and for LoRA with ``merged`` the merged model (with
        ``num_stages`` > 1 each stage wrote its shard, :meth:`write_merged_stage`; here its
        index and metadata)."""
        if not self.lora:
            self.write_metadata(path)
            return
        self._write_tokenizer(path)  # and the generation config, as for a full model:
        (path / GENERATION_CONFIG).write_text(self._generation_config())
        if merged and num_stages == 1:
            self.write_merged(path / MERGED_DIR)
        elif merged:
            from chunkflow.train.checkpoint.store import write_stage_index

            write_stage_index(path / MERGED_DIR, num_stages)
            self.write_metadata(path / MERGED_DIR)

    def write_merged_stage(self, path: Path, stage: int, num_stages: int) -> list[str]:
        """One pipeline stage's shard of the merged model (base + adapter) into ``path``, the
        checkpoint directory; returns its name."""
        from safetensors.torch import save_file

        from chunkflow.train.checkpoint.store import stage_weights_file
        from chunkflow.train.lora import merged_state_dict

        (path / MERGED_DIR).mkdir(exist_ok=True)
        name = f"{MERGED_DIR}/{stage_weights_file(stage, num_stages)}"
        save_file(self.cast(merged_state_dict(self.model)), str(path / name),
                  metadata={"format": "pt"})
        return [name]

    def write_merged(self, path: Path) -> None:
        """A full model directory of base + adapter (LoRA runs)."""
        from safetensors.torch import save_file

        from chunkflow.train.lora import merged_state_dict

        path.mkdir()
        save_file(self.cast(merged_state_dict(self.model)), str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        self.write_metadata(path)

    def write_metadata(self, path: Path) -> None:
        """config.json, generation_config.json and the tokenizer (not the weights)."""
        (path / "config.json").write_text(hf_config_json(self.model, self.dtype))
        (path / GENERATION_CONFIG).write_text(self._generation_config())
        self._write_tokenizer(path)

    def _write_tokenizer(self, path: Path) -> None:
        self.tokenizer.save_pretrained(path)

    def _generation_config(self) -> str:
        """The source model's generation config, else one from the tokenizer's special tokens."""
        from transformers import GenerationConfig

        base = self.model.get_base_model() if self.lora else self.model
        config = getattr(base, "generation_config", None)
        if config is None and self.model_path is not None \
                and (Path(self.model_path) / GENERATION_CONFIG).is_file():
            config = GenerationConfig.from_pretrained(self.model_path, local_files_only=True)
        if config is None:
            config = GenerationConfig()
        if config.eos_token_id is None and self.tokenizer.eos_token_id is not None:
            config.eos_token_id = self.tokenizer.eos_token_id
        return config.to_json_string(use_diff=True)

    def load(self, path: Path, *, stage: bool = False) -> None:
        """The weights of checkpoint ``path`` into the model (strict: every tensor used, every
        parameter set; ``stage``: a LoRA model's pipeline stage takes its part of the
        adapter)."""
        if self.lora:
            from chunkflow.train.lora import load_adapter

            load_adapter(self.model, path, stage=stage)
            return
        from safetensors.torch import load_model

        device = next(self.model.parameters()).device
        try:
            missing, unexpected = load_model(self.model, str(path / "model.safetensors"),
                                             strict=False, device=str(device))
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"checkpoint {str(path)!r} does not match the model: "
                             f"{_first_lines(str(e))}") from None
        if missing or unexpected:
            raise ValueError(f"checkpoint {str(path)!r} does not match the model: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")

    def weight_files(self) -> tuple[str, ...]:
        """The files :meth:`load` reads."""
        if self.lora:
            from chunkflow.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

            return ADAPTER_WEIGHTS, ADAPTER_CONFIG
        return ("model.safetensors",)

    def num_bytes(self, *, merged: bool = False) -> int:
        """Bytes of the saved weights (for the disk-space report): the adapter (and, with
        ``merged``, the merged model) or the whole model (and its master weights)."""
        unique = list({id(p): p for p in self.model.parameters()}.values())
        full = sum(p.numel() for p in unique) * self.dtype.itemsize
        if not self.lora:
            return full + (sum(p.numel() * p.element_size() for p in unique)
                           if self.masters else 0)
        adapter = sum(p.numel() * p.element_size() for p in unique if p.requires_grad)
        return adapter + (full if merged else 0)


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    more = f" ... ({len(lines) - n} more lines)" if len(lines) > n else ""
    return " ".join(lines[:n]) + more


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0
