"""plan-train: per-rank memory and run time of a cluster, from the real FSDP2 shards under a fake process group."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import LlamaConfig
from model.llama import Llama
from model.plan import DEFAULT_MFU, DEFAULT_PEAK_FLOPS, plan_training
from model.train_config import TrainConfig


def cluster_config(model: str, seq_len: int, micro_batch: int, global_batch_tokens: int, max_steps: int, tmp_path) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": f"plan-{model}", "output": str(tmp_path / "store"), "model": model,
        "data": [{"manifest": str(tmp_path / "manifest.json")}], "seq_len": seq_len, "micro_batch": micro_batch,
        "global_batch_tokens": global_batch_tokens, "lr": {"max": 4e-4, "min": 4e-5, "warmup_steps": 2000},
        "max_steps": max_steps, "checkpoint_every": 1000, "activation_checkpointing": True,
    })


def rank0_shard(model: str, world_size: int) -> int:
    """FSDP2 splits each parameter's first dimension in ceil(dim / world) rows; rank 0 has a full share."""
    with torch.device("meta"):
        llama = Llama(LlamaConfig.preset(model))
    return sum(math.ceil(p.shape[0] / world_size) * p[0].numel() for p in llama.parameters())


@pytest.mark.parametrize(("model", "nodes", "total", "seq_len", "batch_tokens", "steps"), [
    ("tinyllama-1.1b", 8, 1_100_048_384, 2048, 2048 * 1024, 1_430_512),  # TinyLlama: 2M-token batches, 3T tokens
    ("llama2-7b", 32, 6_738_415_616, 4096, 4096 * 1024, 476_838),  # Llama 2: 4M-token batches, 2T tokens
])
def test_plan_shards_the_model_over_the_cluster(model, nodes, total, seq_len, batch_tokens, steps, tmp_path):
    config = cluster_config(model, seq_len, 2, batch_tokens, steps, tmp_path)
    plan = plan_training(config, nodes=nodes, gpus_per_node=8)
    world = nodes * 8
    assert plan.world_size == world and plan.total_params == total
    assert plan.params_per_rank == rank0_shard(model, world)
    assert total / world <= plan.params_per_rank < 1.01 * total / world
    assert plan.optimizer_bytes == 8 * plan.params_per_rank and plan.checkpoint_bytes == 12 * total
    assert plan.accum_steps * world * config.micro_batch * seq_len == batch_tokens
    assert plan.mfu == DEFAULT_MFU and not plan.mfu_measured  # the run has no metrics yet
    flops_per_step = plan.flops_per_token * batch_tokens
    assert plan.step_time_s == pytest.approx(flops_per_step / (world * DEFAULT_PEAK_FLOPS * DEFAULT_MFU))
    assert plan.days == pytest.approx(plan.step_time_s * steps / 86400)
    assert 0 < plan.activation_bytes < 80 * 2**30 and plan.memory_bytes < 80 * 2**30  # fits an H100
    table = plan.table()
    assert f"{total:,}" in table and f"{plan.params_per_rank:,}" in table and "days to the token budget" in table


def test_a_batch_that_does_not_split_over_the_cluster_is_refused(tmp_path):
    config = cluster_config("tinyllama-1.1b", 2048, 2, 2048 * 1024, 10_000, tmp_path)
    with pytest.raises(ValueError, match="not a multiple of micro_batch 2 x seq_len 2048 x world size 768"):
        plan_training(config, nodes=96, gpus_per_node=8)


def test_plan_train_command_prints_the_table(tmp_path):
    from typer.testing import CliRunner

    from deployments.cli import app

    config = cluster_config("tinyllama-1.1b", 2048, 8, 2048 * 1024, 1_430_512, tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(config.to_json())  # JSON is YAML
    result = CliRunner().invoke(app, ["plan-train", str(path), "--nodes", "8", "--gpus-per-node", "8", "--mfu", "0.5"])
    assert result.exit_code == 0, result.output
    assert "8 nodes x 8 GPUs = 64 ranks" in result.output and "50% (assumed)" in result.output
