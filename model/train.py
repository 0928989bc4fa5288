"""The training program: one torch.distributed entry point for torchrun and Ray Train.

    torchrun --standalone --nproc-per-node 8 -m model.train run.yaml    # or a store URI
    python -m model.train run.yaml                                       # one process

Inside a Ray Train worker (or anywhere the process group already exists) call
`train(config, device)`. GPUs: NCCL, FSDP2 (`fully_shard` per block, then the root), bf16.
CPUs: gloo, DDP (FSDP2 on request), fp32 and deterministic algorithms, so a resumed run
repeats the uninterrupted one bit for bit. AdamW without decay on 1-D parameters (norms,
biases); warmup + cosine on optimizer steps; gradient accumulation to `global_batch_tokens`;
clipping; checkpoints (model/checkpoint.py) every `checkpoint_every` steps and when this
invocation stops, at `max_steps` or after `max_steps_this_run` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from model.checkpoint import TrainState, restore_checkpoint, save_checkpoint
from model.data import BlockLoader, DataError, DataSource
from model.flops import flops_per_token, mfu, peak_bf16_flops
from model.llama import Llama
from model.metrics import MetricsLog
from model.train_config import LRSchedule, TrainConfig
from storage.processes import die_with_parent
from storage.store import open_store

log = logging.getLogger("model.train")  # not __name__: that is __main__ under -m


@dataclass(frozen=True)
class Cluster:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device | None = None) -> tuple[Cluster, bool]:
    """Join (or create) the process group; returns the cluster and whether this call created it."""
    if device is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:  # torchrun
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # a lone process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Cluster(dist.get_rank(), dist.get_world_size(), device), created


def learning_rate(step: int, lr: LRSchedule, max_steps: int) -> float:
    """The lr of optimizer step `step` (0-based): linear warmup, cosine to lr.min, then flat."""
    decay_steps = lr.decay_steps or max_steps
    if step < lr.warmup_steps:
        return lr.max * (step + 1) / (lr.warmup_steps + 1)
    if step >= decay_steps:
        return lr.min
    progress = (step - lr.warmup_steps) / (decay_steps - lr.warmup_steps)
    return lr.min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr.max - lr.min)


def build_model(model: Llama, cluster: Cluster, fsdp: bool, bf16: bool, compile: bool) -> nn.Module:
    """Wrap for data parallelism: FSDP2 (one unit per block, then the root) or DDP."""
    if compile:
        for block in model.model.layers:
            block.compile()  # per block, as torchtitan: parameter names stay unchanged
    model.to(cluster.device)
    model.reset_rope_cache()
    if not fsdp:
        return DistributedDataParallel(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms or biases, the 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr.max, betas=config.betas, eps=config.eps, fused=device.type == "cuda")


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """All-reduce gradients only on the last micro-step of an accumulation."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: BlockLoader,
    config: TrainConfig,
    accum: int,
    lr: float,
    autocast: torch.autocast,
    device: torch.device,
) -> tuple[float, float]:
    """One optimizer step over `accum` micro-batches per rank; returns the loss (mean over the
    global batch) and the gradient norm before clipping. Waits for the device, so it can be timed."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum):
        batch = loader.next_batch(config.micro_batch).to(device, non_blocking=True)
        with gradient_sync(model, micro_step == accum - 1), autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)
            (loss / accum).backward()
        loss_sum += loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_over_ranks(loss_sum / accum), grad_norm.item()


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return value.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, loader: BlockLoader, config: TrainConfig, cluster: Cluster, autocast) -> float:
    """Mean loss over the held-out build's first `val.batches` micro-batches (the same ones every time)."""
    loader.load_state_dict({"position": 0})
    total = torch.zeros((), device=cluster.device)
    for _ in range(config.val.batches):
        batch = loader.next_batch(config.micro_batch).to(cluster.device, non_blocking=True)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)
        total += loss
    return mean_over_ranks(total / config.val.batches)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig, device: torch.device | None = None) -> TrainState:
    """Run (or continue) the training run `config` describes until this invocation's last step."""
    cluster, created_group = init_distributed(device)
    try:
        return _train(config, cluster)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, cluster: Cluster) -> TrainState:
    if cluster.device.type != "cuda":
        torch.use_deterministic_algorithms(True)  # bit-exact resume on CPUs
    loader = BlockLoader(config.data, config.seq_len, config.seed, cluster.rank, cluster.world_size)
    val_loader = None
    if config.val:
        val_loader = BlockLoader([DataSource(manifest=config.val.manifest)], config.seq_len, config.seed,
                                 cluster.rank, cluster.world_size)
        if val_loader.tokenizer.sha256 != loader.tokenizer.sha256:
            raise DataError(f"validation build {config.val.manifest} has another tokenizer than the training data")
    try:
        return _train_loop(config, cluster, loader, val_loader)
    finally:
        loader.close()
        if val_loader is not None:
            val_loader.close()


def _train_loop(config: TrainConfig, cluster: Cluster, loader: BlockLoader, val_loader: BlockLoader | None) -> TrainState:
    on_gpu = cluster.device.type == "cuda"
    bf16 = config.dtype == "bf16" or (config.dtype == "auto" and on_gpu)
    accum = config.accum_steps(cluster.world_size)
    run_store = open_store(config.run_uri)
    staging = config.local_dir / "staging"
    llama_config = config.llama_config(loader.vocab_size)
    if llama_config.vocab_size < loader.vocab_size:
        raise ValueError(f"vocab_size {llama_config.vocab_size} is below the datasets' tokenizer vocabulary {loader.vocab_size}")

    torch.manual_seed(config.seed)  # identical initial weights on every rank, whatever the world size
    raw_model = Llama(llama_config, activation_checkpointing=config.activation_checkpointing)
    flops = flops_per_token(raw_model, config.seq_len)
    fsdp = config.data_parallel == "fsdp" or (config.data_parallel == "auto" and on_gpu)
    model = build_model(raw_model, cluster, fsdp, bf16, config.compile)
    optimizer = build_optimizer(model, config, cluster.device)
    seed_everything(config.seed + cluster.rank)

    model_config = llama_config.model_dump()
    state = restore_checkpoint(run_store, model, optimizer, staging)
    if state is None:
        state = TrainState(0, 0, loader.state_dict(), cluster.world_size, model_config, {})
    else:
        check_resumable(state, model_config)
        loader.load_state_dict(state.loader)
    state.config = config.model_dump(mode="json")

    stop_at = config.max_steps
    if config.max_steps_this_run:
        stop_at = min(stop_at, state.step + config.max_steps_this_run)
    peak = peak_bf16_flops() if on_gpu else None
    metrics = MetricsLog(config.local_dir, run_store, state.step) if cluster.is_main else None
    autocast = torch.autocast(cluster.device.type, dtype=torch.bfloat16, enabled=bf16)
    if cluster.is_main:
        log.info(
            "run %s: %s model, %.1fM parameters, world size %d x %d micro-batches of %dx%d, steps %d -> %d of %d",
            config.run_uri, config.model, raw_model.num_params() / 1e6, cluster.world_size, accum,
            config.micro_batch, config.seq_len, state.step, stop_at, config.max_steps,
        )

    start_step = state.step
    while state.step < stop_at:
        started = time.perf_counter()
        lr = learning_rate(state.step, config.lr, config.max_steps)
        loss_value, grad_norm = train_step(model, optimizer, loader, config, accum, lr, autocast, cluster.device)
        seconds = time.perf_counter() - started
        state.step += 1
        state.tokens_seen += config.global_batch_tokens
        state.loader = loader.state_dict()
        state.world_size = cluster.world_size
        record = {
            "step": state.step,
            "loss": loss_value,
            "lr": lr,
            "tokens": state.tokens_seen,
            "tokens_per_s": config.global_batch_tokens / seconds,
            "grad_norm": grad_norm,
            "mfu": mfu(config.global_batch_tokens / seconds, flops, peak * cluster.world_size) if peak else None,
            "step_time_s": seconds,
            "time": time.time(),
        }
        if val_loader is not None and (state.step % config.val.every == 0 or state.step == stop_at):
            record["val_loss"] = evaluate(model, val_loader, config, cluster, autocast)
        if metrics is not None:
            metrics.log(record)
            log.info(
                "step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f tokens/s%s",
                state.step, config.max_steps, loss_value, lr, record["grad_norm"], record["tokens_per_s"],
                f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else "",
            )
        if state.step % config.checkpoint_every == 0 or state.step == stop_at:
            if metrics is not None:
                metrics.upload()  # before the commit: a committed step's metrics are always on the store
            save_checkpoint(run_store, model, optimizer, state, config.keep_checkpoints, staging)

    if metrics is not None:
        if state.step == start_step:
            log.info("run %s is already at step %d: nothing to do", config.run_uri, state.step)
        metrics.plot()
        metrics.close()
    return state


def check_resumable(state: TrainState, model_config: dict) -> None:
    """A checkpoint continues only the same architecture (the loader checks its own seed and seq_len)."""
    if state.model_config != model_config:
        raise ValueError(f"the newest checkpoint's model {state.model_config} differs from the config's {model_config}")


def _die_with_torchrun() -> None:
    """Exit if torchrun's agent dies (even by SIGKILL): a worker must never outlive its launcher."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    die_with_parent(signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run config: YAML or JSON, a path or a store URI")
    args = parser.parse_args(argv)
    _die_with_torchrun()
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    train(TrainConfig.from_yaml(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
