"""FLOPs per token (torchtitan's convention), peak FLOP/s lookup and MFU."""

from __future__ import annotations

import pytest
import torch

from model import Llama, LlamaConfig
from model.flops import flops_per_token, mfu, peak_bf16_flops


def test_tinyllama_flops_per_token():
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset("tinyllama-1.1b"))
    non_embedding = 1_100_048_384 - 32000 * 2048  # the output head counts, the lookup table does not
    attention = 12 * 22 * 32 * 64 * 2048
    assert flops_per_token(model) == 6 * non_embedding + attention == 7_314_370_560
    assert flops_per_token(model, seq_len=1024) == 6 * non_embedding + attention // 2


@pytest.mark.parametrize(
    "device_name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_flops_by_device_name(device_name, peak):
    assert peak_bf16_flops(device_name) == peak


def test_mfu():
    # 6,000 tokens/s of a 7.3 GFLOP/token model on an H100 SXM.
    assert mfu(6000, 7.3e9, 989e12) == pytest.approx(6000 * 7.3e9 / 989e12)
    assert mfu(989e12 / 1e9, 1e9, 989e12) == pytest.approx(1.0)


def test_peak_flops_of_the_current_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_bf16_flops() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    assert peak_bf16_flops() == 989e12
