"""The model: Llama 2 / TinyLlama architecture (model.llama), its config and presets
(model.config), Hugging Face export/import (model.hf) and FLOPs/MFU accounting (model.flops).

`from model import Llama` imports torch only when asked for: reading a config (model.config,
model.train_config) must not pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Llama": "model.llama", "LlamaConfig": "model.config"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
