"""Checkpoint cost on 2 CPU ranks: sharded DCP saves (sync and async) against the old full-state save.

    .venv/bin/python -m benchmarks.checkpoint                        # small + the largest preset that fits
    .venv/bin/python -m benchmarks.checkpoint --presets tiny --saves 2 --steps-between 2   # quick check

Two gloo processes train the preset with FSDP2 (as on GPUs: each rank holds half the model and
optimizer state) on random tokens and checkpoint `--saves` times, `--steps-between` training
steps apart, to a local folder (or `--store s3://...`), once per method:

- full-state (the earlier format, re-enacted here as the baseline): the full model and AdamW
  state gathered on rank 0 (cpu_offload), written as model.safetensors + optimizer.pt, uploaded
  and committed by rank 0 while the other rank waits at a barrier;
- dcp-sync: model/checkpoint.py's Checkpointer, every rank writing its own shards;
- dcp-async: the same with async_save: the loop goes on while the shards are written.

Per method: save time (call to committed, mean per checkpoint), training stall per checkpoint
(time the loop was blocked in the checkpointer, plus how much slower the steps ran while a save
was in flight than the median step without one), and bytes written per rank. A preset is run
only if its estimated peak memory (both ranks' training state, plus the async CPU copy or the
baseline's full copy on rank 0) fits in 80% of this machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.checkpoint import Checkpointer, RNGState, commit_checkpoint, latest_checkpoint, prune_checkpoints
from model.config import LlamaConfig
from model.llama import Llama
from model.train import (
    Cluster, TrainProgress, build_model, build_optimizer, build_scheduler, training_states,
)
from model.train_config import TrainConfig
from storage.manifest import ObjectInfo
from storage.run_layout import RunLayout
from storage.store import open_store

WORLD_SIZE = 2
METHODS = ("full-state", "dcp-sync", "dcp-async")
STATE_BYTES_PER_PARAM = 16  # fp32 weights, gradients, AdamW's two moments


def fits(preset: str, memory_bytes: int) -> bool:
    """Peak: the training state of both ranks plus, one at a time, the async CPU copy (weights and
    moments, 12 B/param over the ranks) or the baseline's full copy of them on rank 0 (12 B/param)."""
    with torch.device("meta"):
        params = Llama(LlamaConfig.preset(preset)).num_params()
    return params * (STATE_BYTES_PER_PARAM + 12) < 0.8 * memory_bytes


def bench_config(preset: str, output: str) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": f"bench-{preset}", "output": output, "model": preset, "data": [{"manifest": "unused.json"}],
        "seq_len": 64, "global_batch_tokens": 64 * WORLD_SIZE, "micro_batch": 1,
        "lr": {"max": 3e-4, "warmup_steps": 1}, "max_steps": 1000, "checkpoint_every": 1, "seed": 0,
    })


def save_full_state(layout: RunLayout, model, optimizer, step: int, staging: Path) -> None:
    """The earlier format's save: full state gathered on rank 0, written, uploaded and committed there."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    gather = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=gather)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=gather)
    if dist.get_rank() == 0:
        staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging) as tmp:
            files = {"model.safetensors": Path(tmp) / "model.safetensors", "optimizer.pt": Path(tmp) / "optimizer.pt"}
            save_file({k: v.contiguous() for k, v in model_state.items()}, files["model.safetensors"])
            torch.save(optimizer_state, files["optimizer.pt"])
            infos = []
            for name, path in files.items():
                layout.store.put_file(f"{RunLayout.checkpoint(step)}/{name}", path)
                infos.append(ObjectInfo.of_file(name, path))
            commit_checkpoint(layout.store, step, infos)
        prune_checkpoints(layout.store, keep=1)
    dist.barrier()


class Trainer:
    """One rank's FSDP2 model, optimizer and a random-token train step."""

    def __init__(self, config: TrainConfig, rank: int):
        with torch.device("meta"):
            raw = Llama(config.llama_config())
        self.llama_config = raw.config
        self.model = build_model(raw, Cluster(rank, WORLD_SIZE, torch.device("cpu")), fsdp=True, bf16=False,
                                 compile=False, seed=config.seed)
        self.optimizer = build_optimizer(self.model, config, torch.device("cpu"))
        self.scheduler = build_scheduler(self.optimizer, config)
        self.progress = TrainProgress(world_size=WORLD_SIZE)
        self.vocab = raw.config.vocab_size

    def step(self) -> float:
        started = time.perf_counter()
        tokens = torch.randint(0, self.vocab, (1, 65))
        _, loss = self.model(tokens[:, :-1], tokens[:, 1:], return_logits=False)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        return time.perf_counter() - started


def run_method(method: str, trainer: Trainer, layout: RunLayout, args, rank: int, staging: Path) -> dict:
    checkpointer = None
    if method != "full-state":
        states = training_states(trainer.model, trainer.optimizer, trainer.scheduler, {"position": 0},
                                 trainer.progress, trainer.llama_config, RNGState(rank))
        checkpointer = Checkpointer(layout, states, keep=1, staging_dir=staging, async_save=method == "dcp-async")
    quiet = statistics.median(trainer.step() for _ in range(args.steps_between))
    blocked, slowdown, save_s = 0.0, 0.0, []
    for _ in range(args.saves):
        started = time.perf_counter()
        if checkpointer is None:
            save_full_state(layout, trainer.model, trainer.optimizer, trainer.progress.step, staging)
        else:
            checkpointer.save(trainer.progress.step)  # waits for the previous one first
        call_s = time.perf_counter() - started
        blocked += call_s
        step_times = [trainer.step() for _ in range(args.steps_between)]
        slowdown += sum(max(0.0, t - quiet) for t in step_times)
        if checkpointer is not None:
            waited = time.perf_counter()
            checkpointer.wait()  # counted as stall: the next save would wait here
            blocked += time.perf_counter() - waited
        save_s.append(call_s if checkpointer is None else checkpointer.last_save_s)
    if checkpointer is not None:
        checkpointer.close()
    dist.barrier()
    newest = latest_checkpoint(layout.store) if rank == 0 else None
    written = {}
    if newest is not None:
        for info in newest.files:
            owner = 0 if not info.key.startswith("__") else int(info.key[2:].split("_")[0])
            written[owner] = written.get(owner, 0) + info.size
    return {"save_s": statistics.mean(save_s), "stall_s": (blocked + slowdown) / args.saves,
            "quiet_step_s": quiet, "bytes_per_rank": [written.get(r, 0) for r in range(WORLD_SIZE)]}


def threads_per_rank() -> int:
    return max(1, (os.cpu_count() or 2) // WORLD_SIZE)


def worker(rank: int, args, init_file: str, results_dir: str) -> None:
    torch.set_num_threads(threads_per_rank())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        for preset in args.presets:
            config = bench_config(preset, args.store)
            trainer = Trainer(config, rank)
            trainer.step()  # AdamW state exists from here
            for method in METHODS:
                layout = RunLayout(open_store(args.store).child(f"bench-{preset}-{method}"))
                result = run_method(method, trainer, layout, args, rank, Path(results_dir) / f"staging-{rank}")
                if rank == 0:
                    result.update(preset=preset, method=method,
                                  params=sum(p.numel() for p in trainer.model.parameters()))
                    with open(Path(results_dir) / "results.jsonl", "a") as f:
                        f.write(json.dumps(result) + "\n")
            del trainer
    finally:
        dist.destroy_process_group()


def default_presets(memory_bytes: int) -> list[str]:
    """`small`, and the largest preset that fits this machine (if larger)."""
    sized = []
    for name in LlamaConfig.preset_names():
        with torch.device("meta"):
            sized.append((Llama(LlamaConfig.preset(name)).num_params(), name))
    fitting = [name for _, name in sorted(sized) if fits(name, memory_bytes)]
    return list(dict.fromkeys(["small", fitting[-1]])) if fitting else ["small"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", help="default: small and the largest preset that fits")
    parser.add_argument("--saves", type=int, default=3, help="checkpoints per method")
    parser.add_argument("--steps-between", type=int, default=4, help="training steps between checkpoints")
    parser.add_argument("--store", help="where the checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    args.presets = args.presets or default_presets(memory)
    for preset in args.presets:
        if not fits(preset, memory):
            parser.error(f"preset {preset} does not fit in 80% of this machine's {memory / 2**30:.0f} GiB")

    with tempfile.TemporaryDirectory(prefix="checkpoint-bench-") as tmp:
        args.store = args.store or str(Path(tmp) / "store")
        torch.multiprocessing.spawn(worker, args=(args, str(Path(tmp) / "init"), tmp), nprocs=WORLD_SIZE, join=True)
        results = [json.loads(line) for line in (Path(tmp) / "results.jsonl").read_text().splitlines()]

    print(f"\n{WORLD_SIZE} gloo ranks, FSDP2, {threads_per_rank()} threads per rank, {args.saves} checkpoints "
          f"per method, {args.steps_between} training steps apart (store: {'S3' if '://' in args.store else 'local folder'})\n")
    print("| preset | parameters | method | save time (s) | stall per checkpoint (s) | "
          "median step (s) | bytes written rank 0 | rank 1 |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['method']} | {r['save_s']:.2f} | {r['stall_s']:.2f} | "
              f"{r['quiet_step_s']:.3f} | {r['bytes_per_rank'][0]:,} | {r['bytes_per_rank'][1]:,} |")


if __name__ == "__main__":
    main()
