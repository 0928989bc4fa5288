"""benchmarks/train_step_gpu.py without a GPU: it refuses clearly, and its loop runs on the CPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks import train_step_gpu


def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU here.*--device cpu"):
        train_step_gpu.main([])


def test_cpu_smoke_run_measures_and_skips_gpu_only_backends(capsys):
    argv = "--device cpu --preset tiny --seq-len 16 --batch 1 --steps 1 --warmup 0 --compile off"
    train_step_gpu.main([*argv.split(), "--backends", "sdpa,sdpa-cudnn"])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()[-2:]}
    assert rows["sdpa-cudnn"].endswith("| CUDA only |")
    tokens_per_s = float(rows["sdpa"].split(" | ")[2].replace(",", ""))
    assert tokens_per_s > 0
