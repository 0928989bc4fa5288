"""Llama 2 / TinyLlama in plain PyTorch.

RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP, pre-norm blocks, untied
output head. Module and parameter names and the RoPE layout (rotate_half) are exactly those of
Hugging Face's LlamaForCausalLM, so `state_dict()` maps one to one to its weights.

Attention runs flash-attn's `flash_attn_func` when it is installed and the inputs are CUDA
bf16/fp16, else PyTorch's scaled_dot_product_attention; both take (B, T, H, D) through
`causal_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from model.config import LlamaConfig

try:
    from flash_attn import flash_attn_func
except ImportError:  # flash-attn is an optional GPU extra; SDPA covers everything else
    flash_attn_func = None

AttentionBackend = Literal["auto", "flash_attn", "sdpa"]


def select_attention_backend(
    requested: AttentionBackend, device_type: str, dtype: torch.dtype
) -> Literal["flash_attn", "sdpa"]:
    """Which kernel `causal_attention` runs for inputs on `device_type` in `dtype`."""
    flash_usable = flash_attn_func is not None and device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "sdpa":
        return "sdpa"
    if requested == "flash_attn":
        if not flash_usable:
            reason = "flash-attn is not installed" if flash_attn_func is None else f"inputs are {device_type} {dtype}"
            raise RuntimeError(f"attention backend 'flash_attn' requested but unusable: {reason}")
        return "flash_attn"
    if requested != "auto":
        raise ValueError(f"unknown attention backend {requested!r}; expected auto, flash_attn or sdpa")
    return "flash_attn" if flash_usable else "sdpa"


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttentionBackend = "auto"
) -> torch.Tensor:
    """Causal self-attention. q: (B, T, H, D); k, v: (B, T, H_kv, D) with H % H_kv == 0 -> (B, T, H, D)."""
    if select_attention_backend(backend, q.device.type, q.dtype) == "flash_attn":
        return flash_attn_func(q, k, v, causal=True)  # native GQA, (B, T, H, D) layout
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=k.size(2) != q.size(2)
    )
    return y.transpose(1, 2)


def rope_cache(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_seq_len, head_dim) in fp32, both halves repeated as in HF."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); cos, sin: (T, D)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and scale in the input dtype, as HF does (same numbers in bf16).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, backend: AttentionBackend):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.backend = backend
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v, self.backend)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, backend: AttentionBackend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A causal language model. Build it under `torch.device("meta")` to get shapes without memory;
    then `to_empty(device=...)` and `init_weights(seed)` (or load weights and `reset_rope_cache()`)."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        attn_backend: AttentionBackend = "auto",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.config = config
        # Recompute each block's activations in backward instead of storing them (training only).
        self.activation_checkpointing = activation_checkpointing
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.dim),
                layers=nn.ModuleList(Block(config, attn_backend) for _ in range(config.n_layers)),
                norm=RMSNorm(config.dim, config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Derived from the config, so not part of the state dict (HF's has no such buffers either).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    def reset_rope_cache(self) -> None:
        """(Re)compute the rotary tables in fp32 on the parameters' device."""
        c = self.config
        self.rope_cos, self.rope_sin = rope_cache(c.head_dim, c.max_seq_len, c.rope_theta, self.lm_head.weight.device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """TinyLlama's initialization (lit-gpt): normal(0, sqrt(2 / 5d)) for embeddings and linear
        layers, 1/sqrt(d)/n_layers for the projections into the residual stream, norms at 1.

        Without `seed`, drawn in place from the global generator (the constructor of an eager model).
        With `seed`, the parameters (allocated by `to_empty`, possibly FSDP2 shards) get the values an
        eager `Llama(config)` gets after `torch.manual_seed(seed)`: the constructors' own draws are
        replayed first, one full parameter at a time on the CPU, and only this rank's shard is kept,
        so memory beyond the shards is one parameter, never the model."""
        if seed is None:
            for param, fill in self._initialization(generator=None, replay_constructors=False):
                fill(param)
        else:
            for param, fill in self._initialization(torch.Generator().manual_seed(seed), replay_constructors=True):
                full = torch.empty(param.shape)  # DTensor.shape is the global shape
                fill(full)
                if isinstance(param, DTensor):
                    param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())
                else:
                    param.copy_(full)
        self.reset_rope_cache()

    def _initialization(
        self, generator: torch.Generator | None, replay_constructors: bool
    ) -> Iterator[tuple[nn.Parameter, Callable[[torch.Tensor], object]]]:
        """(parameter, fill) in the order an eager model draws the values from one generator: with
        `replay_constructors`, first what nn.Linear's and nn.Embedding's own constructors draw
        (kaiming-uniform, normal; nn.Linear has no bias here), then TinyLlama's initialization."""
        std = math.sqrt(2.0 / (5 * self.config.dim))
        residual_std = 1.0 / math.sqrt(self.config.dim) / self.config.n_layers
        initialized: set[int] = set()

        def step(param: nn.Parameter, fill: Callable[[torch.Tensor], object]):
            initialized.add(id(param))
            return param, fill

        if replay_constructors:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    yield step(module.weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))
                elif isinstance(module, nn.Embedding):
                    yield step(module.weight, lambda t: nn.init.normal_(t, generator=generator))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                yield step(module.weight, lambda t: nn.init.normal_(t, mean=0.0, std=std, generator=generator))
            elif isinstance(module, RMSNorm):
                yield step(module.weight, nn.init.ones_)
        for block in self.model.layers:
            for weight in (block.self_attn.o_proj.weight, block.mlp.down_proj.weight):
                yield step(weight, lambda t: nn.init.normal_(t, mean=0.0, std=residual_std, generator=generator))
        if missing := [name for name, p in self.named_parameters() if id(p) not in initialized]:
            raise RuntimeError(f"no initialization for {missing}")  # a new kind of parameter

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count; `exclude_embedding` drops the input table only (torchtitan's FLOPs convention)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, return_logits: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab). With targets (B, T), where
        targets[:, t] is the token that follows idx[:, t]: (logits or None, mean cross-entropy
        computed on fp32 logits); return_logits=False lets the logits be freed before backward."""
        T = idx.size(1)
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(idx)
        for block in self.model.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return (logits if return_logits else None), loss
