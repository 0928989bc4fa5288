"""The training program: one torch.distributed entry point for torchrun and Ray Train.

    torchrun --standalone --nproc-per-node 8 -m model.train run.yaml    # or a store URI
    python -m model.train run.yaml                                       # one process

Inside a Ray Train worker (or anywhere the process group already exists) call
`train(config, device)`. GPUs: NCCL, FSDP2 (`fully_shard` per block, then the root), bf16.
CPUs: gloo, DDP (FSDP2 on request), fp32 and deterministic algorithms, so a resumed run
repeats the uninterrupted one bit for bit. AdamW without decay on 1-D parameters (norms,
biases); warmup + cosine on optimizer steps; gradient accumulation to `global_batch_tokens`;
clipping; checkpoints (model/checkpoint/) every `checkpoint_every` steps and when this
invocation stops, at `max_steps` or after `max_steps_this_run` steps.

The model is built on the meta device, sharded, then allocated shard by shard (`materialize`):
no rank ever holds the whole fp32 model. A resume then loads its checkpoint into it; a new run
with `init_from` the weights of that Hugging Face folder (`load_init_from`: only rank 0 holds
them whole, on the CPU); any other new run initializes each shard with the values of an eager
`Llama(config)` after `torch.manual_seed(seed)` (`Llama.init_weights(seed)`). No weights are
drawn only to be overwritten. The loop is a `Trainer` (torchtitan's shape): what it needs as fields,
and what a resume needs, the components' own state (model, optimizer, lr scheduler, loader,
progress counters, RNG), gathered at save time by its one `Checkpointer`.
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
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LambdaLR

from model.checkpoint import (
    DIST_TIMEOUT, RNG_KEY, Architecture, Checkpointer, ModelState, OptimizerState, RNGState,
)
from model.config import LlamaConfig
from model.data import BlockLoader, DataError, DataSource, load_manifests
from model.flops import flops_per_token, mfu, peak_bf16_flops
from model.hf import check_init_from, load_hf, local_hf_folder
from model.llama import Llama
from model.metrics import MetricsLog
from model.reach import read_config_on_every_node, spans_nodes
from model.train_config import LRSchedule, TrainConfig
from runtime.processes import die_with_parent
from storage.run_layout import RunLayout

log = logging.getLogger("model.train")  # not __name__: that is __main__ under -m

# Starts the one log line of a failure that a retry would repeat, a ValueError: bad data or config
# (DataError), a corrupt or refused checkpoint (CheckpointError), refused init_from weights. The
# launcher fails the job with it instead of retrying.
DETERMINISTIC_FAILURE = "training failed on its input: "


def deterministic_failure_line(error: ValueError) -> str:
    return DETERMINISTIC_FAILURE + f"{type(error).__name__}: " + " ".join(str(error).split())


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
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=DIST_TIMEOUT)
        else:  # a lone process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=DIST_TIMEOUT)
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


def build_model(model: Llama, cluster: Cluster, fsdp: bool, bf16: bool, compile: bool, seed: int | None) -> nn.Module:
    """Wrap `model` (built on the meta device) for data parallelism, FSDP2 (one unit per block, then
    the root) or DDP, and materialize it on the cluster's device with the initial weights of `seed`
    (uninitialized with None: weights about to be loaded)."""
    if compile:
        for block in model.model.layers:
            block.compile()  # per block, as torchtitan: parameter names stay unchanged
    if not fsdp:
        materialize(model, cluster.device, seed)
        return DistributedDataParallel(model)  # after materializing: DDP broadcasts rank 0's weights
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    materialize(model, cluster.device, seed)
    return model


@torch.no_grad()
def materialize(model: Llama, device: torch.device, seed: int | None) -> None:
    """Allocate the (possibly sharded) meta-device parameters on `device`; with a `seed`, give each
    rank's shard the values an eager `Llama(config)` gets after `torch.manual_seed(seed)`
    (`Llama.init_weights`). Without, the weights are left for a checkpoint or `init_from` to fill."""
    model.to_empty(device=device)
    if seed is None:
        model.reset_rope_cache()
    else:
        model.init_weights(seed)


def load_init_from(model: nn.Module, config: TrainConfig, cluster: Cluster, llama_config: LlamaConfig) -> None:
    """Give a new run the weights of `config.init_from` (a Hugging Face folder, checked against the
    run's model and data on every rank, so all fail alike): rank 0 reads them, then each rank
    receives its part from rank 0, tensor by tensor (its shards under FSDP2)."""
    manifests, tokenizer = load_manifests(config.data)
    check_init_from(config.init_from, llama_config, tokenizer, manifests[0].documents)
    state: dict[str, torch.Tensor] = {}
    if cluster.is_main:
        config.local_dir.mkdir(parents=True, exist_ok=True)
        with local_hf_folder(config.init_from, staging_dir=config.local_dir) as folder:
            state = load_hf(folder).state_dict()
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if cluster.is_main:
        log.info("new run: initial weights from %s", config.init_from)


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
    autocast: torch.autocast,
    device: torch.device,
) -> tuple[float, float]:
    """One optimizer step over `accum` micro-batches per rank; returns the loss (mean over the
    global batch) and the gradient norm before clipping. Waits for the device, so it can be timed."""
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


@dataclass
class TrainProgress(Stateful):
    """The counters of a run: optimizer steps done and target tokens consumed."""

    step: int = 0
    tokens_seen: int = 0
    world_size: int = 1  # of the invocation that saved it (for the record: a resume may change it)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LambdaLR:
    """`learning_rate` as a torch scheduler over optimizer steps (each group's base lr is lr.max)."""
    return LambdaLR(optimizer, lambda step: learning_rate(step, config.lr, config.max_steps) / config.lr.max)


def training_states(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    loader: Stateful | dict[str, Any],
    progress: TrainProgress,
    llama_config: LlamaConfig,
    rng: Stateful | dict[str, Any],
) -> dict[str, Any]:
    """What a checkpoint holds, by key: each component hands over its own state at save time."""
    return {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "scheduler": scheduler,
        "loader": loader,
        "progress": progress,
        "architecture": Architecture(llama_config),
        RNG_KEY: rng,
    }


def train(config: TrainConfig, device: torch.device | None = None) -> TrainProgress:
    """Run (or continue) the training run `config` describes until this invocation's last step."""
    cluster, created_group = init_distributed(device)
    try:
        return _train(config, cluster)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, cluster: Cluster) -> TrainProgress:
    if cluster.device.type != "cuda":
        torch.use_deterministic_algorithms(True)  # bit-exact resume on CPUs
    loader = BlockLoader(config.data, config.seq_len, config.seed, cluster.rank, cluster.world_size,
                         cache_dir=config.shard_cache_dir, nodes=config.loader_nodes)
    val_loader = None
    if config.val:
        val_loader = BlockLoader([DataSource(manifest=config.val.manifest)], config.seq_len, config.seed,
                                 cluster.rank, cluster.world_size, cache_dir=config.shard_cache_dir,
                                 nodes=config.loader_nodes)
        if val_loader.tokenizer.sha256 != loader.tokenizer.sha256:
            raise DataError(f"validation build {config.val.manifest} has another tokenizer than the training data")
    try:
        return _train_loop(config, cluster, loader, val_loader)
    finally:
        loader.close()
        if val_loader is not None:
            val_loader.close()


def _train_loop(
    config: TrainConfig, cluster: Cluster, loader: BlockLoader, val_loader: BlockLoader | None
) -> TrainProgress:
    trainer = Trainer(config, cluster, loader, val_loader)
    try:
        trainer.resume_or_initialize()
        trainer.run()
    finally:
        trainer.checkpointer.close()  # the last checkpoint committed before the program ends
    return trainer.progress


class Trainer:
    """The training loop and the state it needs, as torchtitan's Trainer: the model (built on the
    meta device, wrapped and allocated), optimizer, lr scheduler, loaders and progress counters
    as fields, their Stateful parts handed to the one `Checkpointer` that saves and restores them."""

    def __init__(self, config: TrainConfig, cluster: Cluster, loader: BlockLoader, val_loader: BlockLoader | None):
        self.config, self.cluster, self.loader, self.val_loader = config, cluster, loader, val_loader
        on_gpu = cluster.device.type == "cuda"
        self.bf16 = config.dtype == "bf16" or (config.dtype == "auto" and on_gpu)
        self.accum = config.accum_steps(cluster.world_size)
        self.layout = RunLayout.of(config.output, config.name)
        self.llama_config = config.llama_config(loader.vocab_size)
        if self.llama_config.vocab_size < loader.vocab_size:
            raise ValueError(f"vocab_size {self.llama_config.vocab_size} is below the datasets' tokenizer "
                             f"vocabulary {loader.vocab_size}")

        with torch.device("meta"):
            self.raw_model = Llama(self.llama_config, activation_checkpointing=config.activation_checkpointing)
        self.flops = flops_per_token(self.raw_model, config.seq_len)
        self.peak_flops = peak_bf16_flops() if on_gpu else None  # one device's (no MFU on CPUs)
        fsdp = config.data_parallel == "fsdp" or (config.data_parallel == "auto" and on_gpu)
        # Allocated only: a resume or init_from fills the weights, a new run initializes them then.
        self.model = build_model(self.raw_model, cluster, fsdp, self.bf16, config.compile, seed=None)
        self.optimizer = build_optimizer(self.model, config, cluster.device)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.autocast = torch.autocast(cluster.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        seed_everything(config.seed + cluster.rank)

        self.progress = TrainProgress(world_size=cluster.world_size)
        self.checkpointer = Checkpointer(
            self.layout,
            training_states(self.model, self.optimizer, self.scheduler, loader, self.progress, self.llama_config,
                            RNGState(cluster.rank)),
            keep=config.keep_checkpoints,
            staging_dir=config.local_dir / "staging",
            async_save=config.async_checkpoint,
        )

    def resume_or_initialize(self) -> None:
        """Load the newest checkpoint that verifies; a new run takes `init_from` or the seed's weights."""
        if self.checkpointer.load(start_over=self.config.start_over) is None:
            if self.config.init_from:
                load_init_from(self.model, self.config, self.cluster, self.llama_config)
            else:  # the same initial weights on every rank, whatever the world size
                self.raw_model.init_weights(self.config.seed)

    def run(self) -> None:
        """Train to this invocation's last step, checkpointing every `checkpoint_every` steps and at it."""
        config, cluster, progress = self.config, self.cluster, self.progress
        stop_at = config.max_steps
        if config.max_steps_this_run:
            stop_at = min(stop_at, progress.step + config.max_steps_this_run)
        metrics = (MetricsLog(config.local_dir, self.layout.store, progress.step, config.log_every, config.max_steps)
                   if cluster.is_main else None)
        if cluster.is_main:
            log.info(
                "run %s: %s model, %.1fM parameters, world size %d x %d micro-batches of %dx%d, steps %d -> %d of %d",
                self.layout.uri, config.model, self.raw_model.num_params() / 1e6, cluster.world_size, self.accum,
                config.micro_batch, config.seq_len, progress.step, stop_at, config.max_steps,
            )
        start_step = progress.step
        while progress.step < stop_at:
            record = self.step()
            if self.val_loader is not None and (progress.step % config.val.every == 0 or progress.step == stop_at):
                record["val_loss"] = evaluate(self.model, self.val_loader, config, cluster, self.autocast)
            checkpointing = progress.step % config.checkpoint_every == 0 or progress.step == stop_at
            if metrics is not None:
                metrics.log(record, checkpoint=checkpointing)
            if checkpointing:
                if metrics is not None:
                    metrics.upload()  # before the commit: a committed step's metrics are always on the store
                self.checkpointer.save(progress.step)

        if metrics is not None:
            if progress.step == start_step:
                log.info("run %s is already at step %d: nothing to do", self.layout.uri, progress.step)
            metrics.plot()
            metrics.close()

    def step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics record."""
        config, progress = self.config, self.progress
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        loss_value, grad_norm = train_step(self.model, self.optimizer, self.loader, config, self.accum, self.autocast,
                                           self.cluster.device)
        self.scheduler.step()
        seconds = time.perf_counter() - started
        progress.step += 1
        progress.tokens_seen += config.global_batch_tokens
        peak = self.peak_flops
        return {
            "step": progress.step,
            "loss": loss_value,
            "lr": lr,
            "tokens": progress.tokens_seen,
            "tokens_per_s": config.global_batch_tokens / seconds,
            "grad_norm": grad_norm,
            "mfu": mfu(config.global_batch_tokens / seconds, self.flops, peak * self.cluster.world_size) if peak else None,
            "step_time_s": seconds,
            "time": time.time(),
        }


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
    try:
        if spans_nodes():  # every node checks the config's local paths before training (model/reach.py)
            init_distributed()
        train(read_config_on_every_node(args.config))
    except ValueError as error:
        log.error("%s", deterministic_failure_line(error))
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
