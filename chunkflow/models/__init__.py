"""Reference Llama/Qwen2-family model with Hugging Face parameter and config names."""

from chunkflow.models.config import PRESETS, ModelConfig, get_preset
from chunkflow.models.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer", "get_preset"]
