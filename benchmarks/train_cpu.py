"""Overhead of the training harness on a CPU: model/train.py's step vs a bare nanoGPT-style loop.

    .venv/bin/python -m benchmarks.train_cpu [--preset small] [--steps 16] [--seq-len 128]

Both run in this process, on the same model (the preset with the synthetic build's vocabulary),
the same batch shape (micro_batch x seq_len, `accum` micro-steps per optimizer step), the same
AdamW and clipping, and the same threads:

- bare: a fixed random batch, forward/backward/clip/step, nothing else (nanoGPT's inner loop);
- harness: model/train.py's `train_step` as its training loop calls it: batches from the
  BlockLoader (a synthetic build in a local folder), the DDP wrapper (gloo, world size 1),
  gradient-sync control, lr schedule, loss all-reduce, deterministic algorithms, and the
  metrics + TensorBoard record of every step (with the log line every log_every steps and
  the progress record put on the store every 10 s, as rank 0 does).

The machine may be shared and its load drifts, so the two alternate step by step (which goes
first alternates too); medians skip the first two steps of each. A checkpoint (every
component's state written as DCP shards, committed, metrics uploaded) is timed once and shown amortized over
`--checkpoint-every` steps. Target: harness overhead < 10%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model import Llama
from model.checkpoint import Checkpointer, RNGState
from model.data import BlockLoader
from model.metrics import MetricsLog
from model.train import (
    TrainProgress, build_model, build_optimizer, build_scheduler, init_distributed, train_step, training_states,
)
from model.train_config import TrainConfig
from storage.run_layout import RunLayout
from tests.model.synthetic import write_synthetic_build

VOCAB = 8192
TARGET = 0.10
WARMUP_STEPS = 2


def bench_config(args, manifest: str, folder: Path) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": "bench",
            "output": str(folder / "store"),
            "work_dir": str(folder / "work"),
            "model": args.preset,
            "data": [{"manifest": manifest}],
            "seq_len": args.seq_len,
            "global_batch_tokens": args.micro_batch * args.seq_len * args.accum,
            "micro_batch": args.micro_batch,
            "lr": {"max": 3e-4, "min": 3e-5, "warmup_steps": 2},
            "max_steps": args.steps,
            "checkpoint_every": args.checkpoint_every,
            "seed": 0,
        }
    )


class BareLoop:
    """nanoGPT's loop: same model, optimizer and batch shape; no loader, wrapper, metrics or checkpoints."""

    def __init__(self, config: TrainConfig):
        torch.manual_seed(config.seed)
        self.model = Llama(config.llama_config(VOCAB))
        self.optimizer = build_optimizer(self.model, config, torch.device("cpu"))
        self.accum = config.accum_steps(1)
        self.grad_clip = config.grad_clip
        batch = torch.randint(0, VOCAB, (config.micro_batch, config.seq_len + 1))
        self.x, self.y = batch[:, :-1], batch[:, 1:]

    def step(self) -> float:
        torch.use_deterministic_algorithms(False)  # the harness turns it on: its cost is the harness's
        started = time.perf_counter()
        for _ in range(self.accum):
            _, loss = self.model(self.x, self.y, return_logits=False)
            (loss / self.accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - started


class Harness:
    """The training program's step and per-step logging, set up as model/train.py sets them up."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.cluster, _ = init_distributed(torch.device("cpu"))
        self.loader = BlockLoader(config.data, config.seq_len, config.seed, cache_dir=config.shard_cache_dir)
        with torch.device("meta"):
            raw = Llama(config.llama_config(VOCAB))
        self.model = build_model(raw, self.cluster, fsdp=False, bf16=False, compile=False, seed=config.seed)
        self.optimizer = build_optimizer(self.model, config, self.cluster.device)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.progress = TrainProgress()
        layout = RunLayout.of(config.output, config.name)
        self.checkpointer = Checkpointer(
            layout,
            training_states(self.model, self.optimizer, self.scheduler, self.loader, self.progress,
                            raw.config, RNGState(0)),
            keep=1, staging_dir=config.local_dir / "staging",
        )
        self.metrics = MetricsLog(config.local_dir, layout.store, 0, config.log_every, config.max_steps)
        self.accum = config.accum_steps(1)
        self.autocast = torch.autocast("cpu", enabled=False)
        self.steps = 0

    def step(self) -> float:
        torch.use_deterministic_algorithms(True)
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        loss, grad_norm = train_step(
            self.model, self.optimizer, self.loader, self.config, self.accum, self.autocast, self.cluster.device
        )
        self.scheduler.step()
        self.steps += 1
        self.progress.step = self.steps
        seconds = time.perf_counter() - started
        tokens = self.config.global_batch_tokens
        self.metrics.log({"step": self.steps, "loss": loss, "lr": lr, "tokens": tokens * self.steps,
                          "tokens_per_s": tokens / seconds, "grad_norm": grad_norm, "mfu": None,
                          "step_time_s": seconds, "time": time.time()})
        return time.perf_counter() - started

    def checkpoint(self) -> float:
        started = time.perf_counter()
        self.metrics.upload()
        self.checkpointer.save(self.steps)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=16, help="steps of each loop")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    args = parser.parse_args()

    bare_times, harness_times = [], []
    with tempfile.TemporaryDirectory(prefix="train-cpu-bench-") as tmp:
        folder = Path(tmp)
        tokens_needed = args.steps * args.micro_batch * args.accum * (args.seq_len + 1)
        manifest = write_synthetic_build(
            str(folder / "store"), "bench", {"web": [1000] * (tokens_needed // 1000 + 10)},
            vocab_size=VOCAB, seed=0, shard_tokens=1 << 20,
        )
        config = bench_config(args, manifest, folder)
        bare, harness = BareLoop(config), Harness(config)
        for i in range(args.steps):
            if i % 2:
                harness_times.append(harness.step())
                bare_times.append(bare.step())
            else:
                bare_times.append(bare.step())
                harness_times.append(harness.step())
        checkpoint_s = harness.checkpoint()
        harness.checkpointer.close()
        harness.metrics.close()
        harness.loader.close()

    bare_median = statistics.median(bare_times[WARMUP_STEPS:])
    harness_median = statistics.median(harness_times[WARMUP_STEPS:])
    with_checkpoints = harness_median + checkpoint_s / args.checkpoint_every
    tokens = config.global_batch_tokens
    params = Llama(config.llama_config(VOCAB)).num_params()
    print(f"\n{args.preset} preset, vocab {VOCAB} ({params / 1e6:.1f}M parameters), {tokens} tokens per step "
          f"({args.micro_batch} x {args.seq_len} x {args.accum} micro-steps), {torch.get_num_threads()} threads, "
          f"{args.steps} alternating steps each (median of the last {args.steps - WARMUP_STEPS})\n")
    print("| loop | median step (s) | tokens/s | vs bare |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in (
        ("bare nanoGPT-style", bare_median),
        ("harness: train_step + metrics", harness_median),
        (f"harness + a checkpoint every {args.checkpoint_every} steps", with_checkpoints),
    ):
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {seconds / bare_median - 1:+.1%} |")
    overhead = harness_median / bare_median - 1
    print(f"\none checkpoint: {checkpoint_s:.2f} s; harness overhead {overhead:+.1%} "
          f"(target < {TARGET:.0%}: {'met' if overhead < TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
