"""A dry run of a training run on a cluster: what each rank holds, and how long the run takes.

    tinyllama plan-train run.yaml --nodes 8 --gpus-per-node 8 [--mfu 0.4] [--peak-tflops 989]

The model is built on the `meta` device (no memory) and sharded with FSDP2 exactly as the
training program shards it (one unit per block, then the root) under torch's fake process
group at the planned world size, so the per-rank numbers are the real shard shapes of rank 0
(the largest: FSDP2 pads the last ranks). Memory per rank, for bf16 FSDP2 training:

- parameters: the fp32 shard (4 bytes per local parameter);
- gradients: fp32 shards (reduce_dtype) — 4 bytes per local parameter;
- optimizer: AdamW's two fp32 moments — 8 bytes per local parameter;
- gathered block: the largest block all-gathered in bf16, twice (FSDP2 prefetches the next);
- activations of one micro-batch, an estimate: per token and layer a Llama block keeps about
  7·dim + 4·kv_dim + 4·ffn_dim bf16 values for backward (norm inputs and outputs, q/k/v,
  attention output, SwiGLU's gate, up, activation and product; flash/SDPA attention keeps no
  seq² matrix); with activation checkpointing only each block's fp32 input is kept, plus one
  block recomputed; plus the logits (bf16, and fp32 for the loss) of the micro-batch.

The checkpoint is fp32 weights and AdamW moments: 12 bytes per parameter, split over the ranks.
Step time is FLOPs per step (model/flops.py, torchtitan's convention) over world size x peak x
MFU; the MFU is the run's measured median when its metrics have one, else 40%.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from model.flops import flops_per_token
from model.llama import Llama
from model.metrics import read_metrics
from model.train_config import TrainConfig
from storage.store import StoreError, open_store

DEFAULT_MFU = 0.40
DEFAULT_PEAK_FLOPS = 989e12  # H100 SXM dense bf16
BF16, FP32 = 2, 4
LOSS_BYTES_PER_LOGIT = BF16 + FP32


@dataclass(frozen=True)
class TrainingPlan:
    nodes: int
    gpus_per_node: int
    total_params: int
    params_per_rank: int
    largest_block_params: int
    accum_steps: int
    micro_batch: int
    seq_len: int
    tokens_per_step: int
    max_steps: int
    flops_per_token: int
    activation_bytes: int
    activation_checkpointing: bool
    mfu: float
    mfu_measured: bool
    peak_flops: float

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def param_bytes(self) -> int:
        return FP32 * self.params_per_rank

    @property
    def grad_bytes(self) -> int:
        return FP32 * self.params_per_rank

    @property
    def optimizer_bytes(self) -> int:
        return 2 * FP32 * self.params_per_rank

    @property
    def gathered_bytes(self) -> int:
        return 2 * BF16 * self.largest_block_params

    @property
    def memory_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.gathered_bytes + self.activation_bytes

    @property
    def checkpoint_bytes_per_rank(self) -> int:
        return (FP32 + 2 * FP32) * self.params_per_rank

    @property
    def checkpoint_bytes(self) -> int:
        return (FP32 + 2 * FP32) * self.total_params

    @property
    def step_time_s(self) -> float:
        return self.flops_per_token * self.tokens_per_step / (self.world_size * self.peak_flops * self.mfu)

    @property
    def token_budget(self) -> int:
        return self.tokens_per_step * self.max_steps

    @property
    def days(self) -> float:
        return self.step_time_s * self.max_steps / 86400

    def rows(self) -> list[tuple[str, str]]:
        ckpt = "on" if self.activation_checkpointing else "off"
        mfu = f"{self.mfu:.0%} ({'measured' if self.mfu_measured else 'assumed'})"
        return [
            ("world size", f"{self.nodes} nodes x {self.gpus_per_node} GPUs = {self.world_size} ranks"),
            ("parameters (model)", f"{self.total_params:,}"),
            ("parameters per rank", f"{self.params_per_rank:,} ({_gib(self.param_bytes)} fp32)"),
            ("gradients per rank", _gib(self.grad_bytes) + " fp32"),
            ("optimizer state per rank", _gib(self.optimizer_bytes) + " (AdamW, 2 x fp32)"),
            ("gathered block (bf16, x2 prefetch)", _gib(self.gathered_bytes)),
            (f"activations per micro-batch {self.micro_batch}x{self.seq_len} (checkpointing {ckpt})",
             _gib(self.activation_bytes) + " (estimate)"),
            ("memory per rank, total", _gib(self.memory_bytes)),
            ("checkpoint per rank / whole", f"{_gib(self.checkpoint_bytes_per_rank)} / {_gib(self.checkpoint_bytes)}"),
            ("tokens per step", f"{self.tokens_per_step:,} ({self.accum_steps} micro-steps of "
                                f"{self.micro_batch}x{self.seq_len} per rank)"),
            ("MFU, peak per GPU", f"{mfu}, {self.peak_flops / 1e12:.0f} TFLOP/s"),
            ("step time", f"{self.step_time_s:.2f} s"),
            ("token budget (max_steps x tokens per step)", f"{self.token_budget / 1e9:,.0f}B tokens in {self.max_steps:,} steps"),
            ("days to the token budget", f"{self.days:.1f}"),
        ]

    def table(self) -> str:
        lines = ["| per rank | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value} |" for name, value in self.rows()]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def activation_bytes(config: TrainConfig, llama: Llama) -> int:
    c = llama.config
    tokens = config.micro_batch * config.seq_len
    kv_dim = c.n_kv_heads * c.head_dim
    block = BF16 * (7 * c.dim + 4 * kv_dim + 4 * c.ffn_dim) * tokens
    logits = LOSS_BYTES_PER_LOGIT * c.vocab_size * tokens
    if config.activation_checkpointing:
        return FP32 * c.dim * tokens * c.n_layers + block + logits
    return block * c.n_layers + logits


def measured_mfu(config: TrainConfig) -> float | None:
    """The median MFU of the run's recorded steps, if it has trained on GPUs."""
    try:
        records = read_metrics(open_store(config.run_uri))
    except StoreError:  # no such run yet, or its metrics are not readable: assume
        return None
    values = [r["mfu"] for r in records if r.get("mfu")]
    return statistics.median(values) if values else None


def plan_training(
    config: TrainConfig, nodes: int, gpus_per_node: int, mfu: float | None = None, peak_flops: float = DEFAULT_PEAK_FLOPS
) -> TrainingPlan:
    """Shard the config's model on `meta` under a fake process group of nodes x gpus_per_node ranks."""
    world_size = nodes * gpus_per_node
    accum = config.accum_steps(world_size)  # global_batch_tokens must split over this world size
    if dist.is_initialized():
        raise RuntimeError("plan_training needs a process without a process group (it creates a fake one)")
    measured = measured_mfu(config) if mfu is None else None
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        with torch.device("meta"):
            llama = Llama(config.llama_config(), activation_checkpointing=config.activation_checkpointing)
        total = llama.num_params()
        largest_block = max(sum(p.numel() for p in block.parameters()) for block in llama.model.layers)
        flops = flops_per_token(llama, config.seq_len)
        mesh = init_device_mesh("cpu", (world_size,))
        for block in llama.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(llama, mesh=mesh)
        per_rank = sum(p.to_local().numel() for p in llama.parameters())
        activations = activation_bytes(config, llama)
    finally:
        dist.destroy_process_group()
    return TrainingPlan(
        nodes=nodes, gpus_per_node=gpus_per_node, total_params=total, params_per_rank=per_rank,
        largest_block_params=largest_block, accum_steps=accum, micro_batch=config.micro_batch,
        seq_len=config.seq_len, tokens_per_step=config.global_batch_tokens, max_steps=config.max_steps,
        flops_per_token=flops, activation_bytes=activations,
        activation_checkpointing=config.activation_checkpointing,
        mfu=mfu or measured or DEFAULT_MFU, mfu_measured=mfu is None and measured is not None, peak_flops=peak_flops,
    )
