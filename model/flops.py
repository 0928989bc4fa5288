"""FLOPs per token and model FLOPs utilization (MFU), by torchtitan's convention.

FLOPs per trained token = 6 * N + 12 * L * H * Dh * T, where N counts the parameters without
the input embedding table (a lookup, not a matmul; the output head is counted), L layers,
H query heads of size Dh, T the sequence length. 6N is forward (2N) plus backward (4N) of the
matmuls; the attention term is QK^T and AV (2 matmuls, x3 for fwd+bwd, x2 FLOPs per MAC) and,
by convention, ignores causal sparsity and flash-attention's recomputation.
"""

from __future__ import annotations

import torch

from model.llama import Llama

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, most specific name first:
# a device name is matched by the first entry it contains.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def flops_per_token(model: Llama, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token at `seq_len` (default: the model's context)."""
    c = model.config
    seq_len = seq_len or c.max_seq_len
    return 6 * model.num_params(exclude_embedding=True) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def peak_bf16_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by name (default: the current CUDA device); None if unknown."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the hardware peak (0..1)."""
    return tokens_per_s * flops_per_token / peak_flops
