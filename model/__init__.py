"""The model: Llama 2 / TinyLlama architecture (model.llama), its config and presets
(model.config), Hugging Face export/import (model.hf) and FLOPs/MFU accounting (model.flops)."""

from model.config import LlamaConfig
from model.llama import Llama

__all__ = ["Llama", "LlamaConfig"]
