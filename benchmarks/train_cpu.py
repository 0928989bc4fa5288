"""Overhead of the training harness on a CPU: model/train.py's step vs a bare nanoGPT-style loop.

    .venv/bin/python -m benchmarks.train_cpu [--preset small] [--rounds 5] [--steps 3] [--seq-len 128]

Both run in this process, on the same model (the preset with the synthetic build's vocabulary),
the same batch shape (micro_batch x seq_len, `accum` micro-steps per optimizer step) and the
same AdamW, clipping and thread count:

- bare: a fixed random batch, forward/backward/clip/step, nothing else (nanoGPT's inner loop);
- harness: `model.train.train(config)` on a synthetic build in a local folder: the BlockLoader,
  DDP (world size 1, gloo), loss all-reduce, lr schedule, metrics.jsonl + TensorBoard per step,
  a checkpoint at the end of each segment. Its step time is metrics.jsonl's `step_time_s`;
  "amortized" is the wall time from a segment's first to its last step record over the steps
  between (adding what logging between steps costs).

On a shared machine the load drifts, so the two alternate: `rounds` times `steps` bare steps,
then a `steps`-step harness segment (max_steps_this_run; each resumes from the last
checkpoint). Medians skip the first step of every round. Target: harness overhead < 10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model import Llama
from model.train import build_optimizer, train
from model.train_config import TrainConfig
from tests.model.synthetic import write_synthetic_build

VOCAB = 8192
TARGET = 0.10


def harness_config(args, manifest: str, folder: Path) -> TrainConfig:
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
            "max_steps": args.rounds * args.steps,
            "max_steps_this_run": args.steps,
            "checkpoint_every": args.steps,
            "keep_checkpoints": 1,
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

    def run(self, steps: int) -> list[float]:
        torch.use_deterministic_algorithms(False)  # the harness turns it on (its cost is the harness's)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            for _ in range(self.accum):
                _, loss = self.model(self.x, self.y, return_logits=False)
                (loss / self.accum).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - started)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round (the first is not timed)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    args = parser.parse_args()

    bare_times, harness_times, amortized = [], [], []
    with tempfile.TemporaryDirectory(prefix="train-cpu-bench-") as tmp:
        folder = Path(tmp)
        tokens_needed = args.rounds * args.steps * args.micro_batch * args.accum * (args.seq_len + 1)
        manifest = write_synthetic_build(
            str(folder / "store"), "bench", {"web": [1000] * (tokens_needed // 1000 + 10)},
            vocab_size=VOCAB, seed=0, shard_tokens=1 << 20,
        )
        config = harness_config(args, manifest, folder)
        bare = BareLoop(config)
        for _ in range(args.rounds):
            bare_times += bare.run(args.steps)[1:]
            train(config)
            lines = (config.local_dir / "metrics.jsonl").read_text().splitlines()
            segment = [json.loads(line) for line in lines[-args.steps :]][1:]
            harness_times += [r["step_time_s"] for r in segment]
            amortized.append((segment[-1]["time"] - segment[0]["time"]) / (len(segment) - 1))

    bare_median = statistics.median(bare_times)
    rows = (
        ("bare nanoGPT-style", bare_median),
        ("harness (model/train.py)", statistics.median(harness_times)),
        ("harness, amortized between steps", statistics.median(amortized)),
    )
    tokens = config.global_batch_tokens
    params = Llama(config.llama_config(VOCAB)).num_params()
    print(f"\n{args.preset} preset, vocab {VOCAB} ({params / 1e6:.1f}M parameters), {tokens} tokens per step "
          f"({args.micro_batch} x {args.seq_len} x {args.accum} micro-steps), {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps each\n")
    print("| loop | median step (s) | tokens/s | vs bare |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} | {seconds / bare_median - 1:+.1%} |")
    overhead = rows[1][1] / bare_median - 1
    print(f"\nharness overhead {overhead:+.1%} (target < {TARGET:.0%}: {'met' if overhead < TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
