"""Reference Llama/Qwen2-family model with Hugging Face parameter and config names."""

from chunkflow.models.config import PRESETS, ModelConfig, get_preset
from chunkflow.models.hf_checkpoint import (
    config_from_hf,
    config_to_hf,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from chunkflow.models.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer", "config_from_hf", "config_to_hf",
           "get_preset", "load_hf_checkpoint", "save_hf_checkpoint"]
