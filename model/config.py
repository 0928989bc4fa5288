"""The model's architecture as a typed config, with named presets.

`LlamaConfig` describes only the network (it doubles as a Prefect/CLI parameter); how it is
trained lives in the training config. Field names follow Llama/TinyLlama papers; model/hf.py
maps them to Hugging Face's config.json keys.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator


class LlamaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: PositiveInt
    n_layers: PositiveInt
    dim: PositiveInt = Field(description="Hidden size")
    n_heads: PositiveInt
    n_kv_heads: PositiveInt = Field(description="Key/value heads (grouped-query attention)")
    ffn_dim: PositiveInt = Field(description="SwiGLU intermediate size")
    max_seq_len: PositiveInt
    norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0
    bos_id: int = Field(1, ge=0)
    eos_id: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _consistent_shapes(self) -> LlamaConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("bos_id", "eos_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary ({self.vocab_size})")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named architecture; overrides (e.g. vocab_size from the build's tokenizer) win."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)


PRESETS: dict[str, dict[str, Any]] = {
    # TinyLlama 1.1B (arXiv 2401.02385): 1,100,048,384 parameters with vocab 32000.
    "tinyllama-1.1b": dict(
        vocab_size=32000, n_layers=22, dim=2048, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048
    ),
    # Llama 2 7B (arXiv 2307.09288): 6,738,415,616 parameters; multi-head attention, context 4096.
    "llama2-7b": dict(
        vocab_size=32000, n_layers=32, dim=4096, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096
    ),
    # ~20M parameters besides the embedding and output tables; a quick real training demo.
    "small": dict(vocab_size=32000, n_layers=12, dim=384, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=1024),
    # ~1M parameters besides the embedding and output tables; trains in seconds on a CPU.
    "tiny": dict(vocab_size=32000, n_layers=4, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=256),
}
