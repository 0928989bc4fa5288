"""Checkpoint cost on 2 CPU ranks: sharded DCP saves (sync and async) against the old full-state save.

    .venv/bin/python -m benchmarks.checkpoint                        # small + the largest preset that fits
    .venv/bin/python -m benchmarks.checkpoint --presets tiny --saves 2 --steps-between 2   # quick check

Two gloo processes train the preset with FSDP2 (as on GPUs: each rank holds half the model and
optimizer state) on random tokens and checkpoint `--saves` times, `--steps-between` training
steps apart, to a local folder (or `--store s3://...`), once per method:

- full-state (the earlier format, re-enacted here as the baseline): the full model and AdamW
  state gathered on rank 0 (cpu_offload), written as model.safetensors + optimizer.pt, uploaded
  and committed by rank 0 while the other rank waits at a barrier;
- dcp-sync: model/checkpoint's Checkpointer, every rank writing its own shards;
- dcp-async: the same with async_save: the loop goes on while the shards are written.

Per method: save time (call to committed, mean per checkpoint), training stall per checkpoint
(time the loop was blocked in the checkpointer, plus how much slower the steps ran while a save
was in flight than the median step without one), and bytes written per rank. A preset is run
only if its estimated peak memory (both ranks' training state, plus the async CPU copy or the
baseline's full copy on rank 0) fits in 80% of this machine's memory.

    .venv/bin/python -m benchmarks.checkpoint --reads --presets tiny small   # export/evaluate reads

`--bookkeeping` counts rank 0's requests to find the checkpoint to resume from, and to commit a
save and prune after it, with 1, 20 and 200 checkpoints kept at world sizes 64 and 256 (empty files
named as those ranks write them; no training), on a SeaweedFS server started here unless
`--store s3://...`:

    .venv/bin/python -m benchmarks.checkpoint --bookkeeping

`--reads` measures instead what reading a checkpoint's model costs (`tinyllama export-hf` and the
evaluate task: model/checkpoint load_model) on S3: a SeaweedFS server started here, unless
`--store s3://...`. The 2 ranks save one checkpoint (`--saves` and `--steps-between` unused), then
this process reads its model twice, the S3 calls counted by botocore's event hooks:
- before (the earlier behaviour, re-enacted here as the baseline): every file of the checkpoint
  hashed one after another, optimizer state included, then one ranged GET per model tensor chunk;
- now: load_model, which fetches only the files that hold the model's tensors, whole and in
  parallel, and verifies those.
Per method: GETs, bytes read, files (and bytes) hashed, seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.checkpoint import (
    Checkpointer, RNGState, commit_checkpoint, latest_checkpoint, load_model, prune_checkpoints, read_metadata,
    read_values, resolve_checkpoint, sha256_mismatches,
)
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


def save_for_reads(rank: int, args, init_file: str, results_dir: str) -> None:
    """One rank: a checkpoint of each preset after one training step, in `<store>/reads-<preset>`."""
    torch.set_num_threads(threads_per_rank())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        for preset in args.presets:
            config = bench_config(preset, args.store)
            trainer = Trainer(config, rank)
            trainer.step()  # AdamW state exists from here
            layout = RunLayout(open_store(args.store).child(f"reads-{preset}"))
            states = training_states(trainer.model, trainer.optimizer, trainer.scheduler, {"position": 0},
                                     trainer.progress, trainer.llama_config, RNGState(rank))
            checkpointer = Checkpointer(layout, states, keep=None, staging_dir=Path(results_dir) / f"staging-{rank}")
            checkpointer.save(trainer.progress.step)
            checkpointer.close()
            if rank == 0:
                layout.write_config(config.model_copy(update={"name": f"reads-{preset}"}).to_json())
            del trainer
    finally:
        dist.destroy_process_group()


def load_model_as_before(run_uri: str) -> None:
    """The earlier read of a checkpoint's model, re-enacted: every file hashed one after another,
    then one ranged GET per model chunk (DCP's reader over the store, as it was)."""
    layout, checkpoint = resolve_checkpoint(run_uri)
    store = layout.store
    if mismatches := sha256_mismatches(store, checkpoint, checkpoint.files):
        raise RuntimeError(mismatches[0])
    read_values(store, checkpoint, "architecture")
    for index, info in read_metadata(store, checkpoint).storage_data.items():
        if index.fqn.startswith("model."):
            data = store.get_range(checkpoint.key(info.relative_path), info.offset, info.length)
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    layout.read_config()


class GetLog:
    """This process's GetObject calls on S3 (botocore's event hooks): key, Range, bytes answered."""

    def __init__(self):
        from storage.s3 import s3_client

        self.calls: list[dict] = []
        events = s3_client().meta.events
        events.register("provide-client-params.s3.GetObject", self._sent, unique_id="bench-get-sent")
        events.register("after-call.s3.GetObject", self._answered, unique_id="bench-get-answered")

    def _sent(self, params, context, **_):
        context["bench_call"] = {"key": params["Key"], "range": params.get("Range"), "bytes": 0}
        self.calls.append(context["bench_call"])  # calls come from several threads: matched by their context

    def _answered(self, parsed, context, **_):
        context["bench_call"]["bytes"] = int(parsed.get("ContentLength", 0))

    def take(self) -> list[dict]:
        taken, self.calls = self.calls, []
        return taken


def measure_reads(run_uri: str, log: GetLog) -> list[dict]:
    """Both ways of reading the model: GETs, bytes read, files and bytes hashed, seconds."""
    _, checkpoint = resolve_checkpoint(run_uri)
    sizes = {f.key: f.size for f in checkpoint.files}
    rows = []
    for method, read in (("before", load_model_as_before), ("now", load_model)):
        log.take()
        started = time.perf_counter()
        read(run_uri)
        seconds = time.perf_counter() - started
        calls = log.take()
        # A file is hashed where it is read whole: both ways verify by reading every byte of a file.
        hashed = {c["key"].rsplit("/", 1)[1] for c in calls if c["range"] is None and f"/{checkpoint.prefix}/" in c["key"]}
        hashed &= sizes.keys()
        rows.append({"method": method, "gets": len(calls), "bytes": sum(c["bytes"] for c in calls),
                     "files_hashed": len(hashed), "bytes_hashed": sum(sizes[name] for name in hashed),
                     "files": len(sizes), "checkpoint_bytes": sum(sizes.values()), "seconds": seconds})
    return rows


def main_reads(args) -> None:
    from benchmarks.scale import s3_bucket  # a SeaweedFS server for as long as the block runs

    with tempfile.TemporaryDirectory(prefix="checkpoint-reads-") as tmp, s3_bucket(args.store, Path(tmp)) as bucket:
        args.store = f"{bucket}/checkpoint-reads"
        torch.multiprocessing.spawn(save_for_reads, args=(args, str(Path(tmp) / "init"), tmp), nprocs=WORLD_SIZE,
                                    join=True)
        log = GetLog()
        results = {preset: measure_reads(f"{args.store}/reads-{preset}", log) for preset in args.presets}

    print(f"\nReading a checkpoint's model (export-hf, evaluate) written by {WORLD_SIZE} FSDP2 ranks, on S3; "
          "GetObject calls counted by botocore's event hooks\n")
    print("| preset | checkpoint files | checkpoint bytes | method | GETs | bytes read | files hashed | "
          "bytes hashed | seconds |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for preset, rows in results.items():
        for r in rows:
            print(f"| {preset} | {r['files']} | {r['checkpoint_bytes']:,} | {r['method']} | {r['gets']} | "
                  f"{r['bytes']:,} | {r['files_hashed']} | {r['bytes_hashed']:,} | {r['seconds']:.2f} |")
        before, now = rows
        print(f"| {preset} | | | now / before | {now['gets'] / before['gets']:.3f} | {now['bytes'] / before['bytes']:.3f} | "
              f"{now['files_hashed'] / before['files_hashed']:.3f} | {now['bytes_hashed'] / before['bytes_hashed']:.3f} | "
              f"{now['seconds'] / before['seconds']:.2f} |")


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


def fake_files(store, world: int, step: int, pool) -> list[ObjectInfo]:
    """The files `world` ranks write for the checkpoint of `step` (a model and an optimizer file per
    rank, .metadata), empty: the bookkeeping's requests do not depend on sizes."""
    names = [f"__{rank}_{kind}.distcp" for rank in range(world) for kind in ("0", "optimizer_0")] + [".metadata"]
    prefix = RunLayout.checkpoint(step)
    list(pool.map(lambda name: store.put_bytes(f"{prefix}/{name}", b""), names))
    return [ObjectInfo(key=name, size=0, sha256="0" * 64) for name in names]


def main_bookkeeping(args) -> None:
    """Rank 0's requests to find the checkpoint to resume from, and to commit a save and prune
    after it, with `args.kept` checkpoints kept at world sizes `args.worlds` (files as those ranks
    write them)."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.scale import s3_bucket
    from benchmarks.scale_model import S3Traffic, traffic_since

    def requests_of(action) -> tuple[dict[str, int], float, object]:
        before, started = traffic.snapshot(), time.perf_counter()
        found = action()
        return traffic_since(before, traffic.snapshot())["requests"], time.perf_counter() - started, found

    def commit_and_prune(store, step: int, files: list[ObjectInfo], keep: int) -> list[int]:
        commit_checkpoint(store, step, files)
        return prune_checkpoints(store, keep, newest=step)

    rows = []
    with (tempfile.TemporaryDirectory(prefix="checkpoint-bookkeeping-") as tmp, s3_bucket(args.store, Path(tmp)) as bucket,
          ThreadPoolExecutor(32) as pool):
        traffic = S3Traffic.in_this_process()
        for world in args.worlds:
            for kept in args.kept:
                store = open_store(f"{bucket}/world-{world}-kept-{kept}")
                for step in range(1, kept + 1):
                    commit_checkpoint(store, step, fake_files(store, world, step, pool))
                *resume, found = requests_of(lambda: latest_checkpoint(store))
                assert found is not None and found.step == kept
                files = fake_files(store, world, kept + 1, pool)  # the ranks' uploads of the next save
                *save, deleted = requests_of(lambda: commit_and_prune(store, kept + 1, files, keep=kept))
                assert deleted == [1]  # the oldest
                rows.append((world, kept, resume, save))

    print("\nRank 0's store requests for checkpoint bookkeeping on S3 (SeaweedFS), counted by botocore's "
          "hooks; each checkpoint holds 2 x world + 2 files\n")
    print("| world | kept | files kept | resume: find the newest | s | a save's commit + prune (keep = kept, "
          "deletes the oldest) | s |")
    print("| ---: | ---: | ---: | --- | ---: | --- | ---: |")
    for world, kept, (resume, resume_s), (save, save_s) in rows:
        described = [", ".join(f"{n} {name}" for name, n in sorted(calls.items())) for calls in (resume, save)]
        print(f"| {world} | {kept} | {kept * (2 * world + 2):,} | {described[0]} | {resume_s:.2f} | "
              f"{described[1]} | {save_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", help="default: small and the largest preset that fits (with --reads: tiny and small)")
    parser.add_argument("--saves", type=int, default=3, help="checkpoints per method")
    parser.add_argument("--steps-between", type=int, default=4, help="training steps between checkpoints")
    parser.add_argument("--store", help="where the checkpoints go (default: a temporary folder; "
                        "with --reads, a SeaweedFS server started here)")
    parser.add_argument("--reads", action="store_true", help="measure export/evaluate reads instead of saves")
    parser.add_argument("--bookkeeping", action="store_true",
                        help="count the requests of resume discovery and pruning with 1, 20 and 200 checkpoints "
                        "kept at world sizes 64 and 256 (no training)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[64, 256], help="with --bookkeeping: world sizes")
    parser.add_argument("--kept", type=int, nargs="+", default=[1, 20, 200],
                        help="with --bookkeeping: numbers of checkpoints kept")
    args = parser.parse_args()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    args.presets = args.presets or (["tiny", "small"] if args.reads else default_presets(memory))
    for preset in args.presets:
        if not fits(preset, memory):
            parser.error(f"preset {preset} does not fit in 80% of this machine's {memory / 2**30:.0f} GiB")
    if args.reads:
        main_reads(args)
        return
    if args.bookkeeping:
        main_bookkeeping(args)
        return

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
