"""Capacity model inputs, in three parts (docs/scaling.md turns them into a capacity model):

    .venv/bin/python -m benchmarks.scale [--bytes 32M] [--no-cluster]          # 1. throughput
    .venv/bin/python -m benchmarks.scale --skip-throughput --metadata 20000 [--s3 s3://bucket/prefix]
    .venv/bin/python -m benchmarks.scale --skip-throughput --dedup-docs 1000000,10000000 [--cpus 2]

1. Throughput: per-core throughput of each build stage on 1 CPU, 2 CPUs and a 2-node Ray
   cluster (one CPU per node, both on this machine), plus the TinyLlama training arithmetic.
   One sample corpus; for each setup Ray is (re)started with that many CPUs, or joined as a
   2-node cluster started with `ray start`, and the same config is built into a fresh folder.
   A stage's time is the wall time of its Prefect task's body (as in benchmarks/build.py); its
   per-core rate is raw MB / (seconds x cores). The tokenizer training sample is capped, so its
   time is a fixed cost, not a per-byte one.
2. Metadata (`--metadata FILES`): a build of FILES tiny input files (3 documents each, inputs
   and outputs on S3: `--s3`, or a SeaweedFS server started here), then a rerun of the finished
   build: for each stage the S3 calls made by the driver (botocore's before-call hook; Ray
   workers are other processes) and its wall time.
3. Memory and files (`--dedup-docs N,...`): exact then near dedup over N synthetic Zipf-word
   documents (benchmarks/dedup.py's corpus, in shards of 10,000) on `--cpus` Ray workers, with
   partitions and batches sized by the build's rules for `--budget` per task: per step the
   tasks, the objects written, the largest task peak RSS (VmHWM reset at each task's start)
   and the largest growth of a task over its worker's RSS at its start (the task's own data),
   and the driver's own peak RSS while the stages ran. `--doc-words` sets the documents'
   median length. One process per N.

benchmarks/scale_model.py sweeps the whole flow over documents, budgets and files and fits each
stage's cost exponents (docs/scaling.md, "The scale model").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks.build import time_stages
from benchmarks.tokenize import parse_bytes
from deployments.settings import configure_prefect

TRAIN_TOKENS = 3e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_bytes, default=parse_bytes("32M"))
    parser.add_argument("--no-cluster", action="store_true", help="Skip the 2-node cluster run")
    parser.add_argument("--skip-throughput", action="store_true", help="Skip part 1")
    parser.add_argument("--metadata", type=int, default=0, metavar="FILES", help="Part 2 with this many input files")
    parser.add_argument("--s3", help="s3://bucket/prefix for part 2 (default: a SeaweedFS server started here)")
    parser.add_argument("--dedup-docs", default="", metavar="N,...", help="Part 3 at these document counts")
    parser.add_argument("--cpus", type=int, default=2, help="Ray workers for part 3")
    parser.add_argument("--budget", type=parse_bytes, default=parse_bytes("1G"), help="task_memory_bytes for part 3")
    parser.add_argument("--doc-words", type=int, default=181, help="median words per synthetic document in part 3 (~8 characters each)")
    parser.add_argument("--one", nargs=3, metavar=("CORPUS_YAML", "CPUS", "RAY_ADDRESS"), help=argparse.SUPPRESS)
    parser.add_argument("--metadata-one", nargs=2, metavar=("INPUTS_URI", "OUTPUT_URI"), help=argparse.SUPPRESS)
    parser.add_argument("--dedup-one", type=int, metavar="DOCS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(Path(args.one[0]), int(args.one[1]), args.one[2] if args.one[2] != "-" else None)
    if args.metadata_one:
        return metadata_one(*args.metadata_one)
    if args.dedup_one:
        return dedup_one(args.dedup_one, args.cpus, args.budget, args.doc_words)
    if not args.skip_throughput:
        throughput(args)
    if args.metadata:
        metadata(args.metadata, args.s3)
    for docs in [int(d) for d in args.dedup_docs.split(",") if d]:
        dedup_scale(docs, args.cpus, args.budget, args.doc_words)


def throughput(args) -> None:
    from demo.sample_corpus import make_sample_corpus

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    corpus = make_sample_corpus(work / "raw", target_bytes=args.bytes)
    raw_mb = sum(s["bytes"] for s in corpus["sources"].values()) / 1e6
    setups = [("local, 1 CPU", 1, None), ("local, 2 CPUs", 2, None)]
    cluster = None
    if not args.no_cluster:
        from tests.reliability.cluster import RayCluster, cluster_env  # the test suite's `ray start` cluster

        cluster = RayCluster()
    results = []
    try:
        if cluster is not None:
            cluster.start_node(head=True)
            cluster.start_node()
            setups.append(("2-node cluster, 1 CPU each", 2, cluster.address))
        for label, cores, address in setups:
            # One process per setup: a driver that re-inits Ray onto a cluster trips over object
            # refs owned by its earlier session.
            env = cluster_env(None) if cluster is not None else None
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.scale", "--one", corpus["config"], str(cores), address or "-"],
                env=env, stdout=subprocess.PIPE, text=True, check=True,  # the child's stderr shows, so a failure names its cause
            ).stdout
            result = {"setup": label, "cores": cores, **json.loads(out.strip().splitlines()[-1])}
            results.append(result)
            print(f"{label}: {result['wall']:.1f} s {result['stages']}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()

    print(f"\n{raw_mb:.1f} MB raw text ({corpus['documents']} documents)\n")
    header = "| stage | " + " | ".join(f"{r['setup']}: s / MB/s per core" for r in results) + " |"
    print(header + "\n|" + " --- |" * (len(results) + 1))
    for name in [*results[0]["stages"], "whole flow"]:
        cells = []
        for r in results:
            s = r["wall"] if name == "whole flow" else r["stages"][name]
            cells.append(f"{s:.1f} / {raw_mb / s / r['cores']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print_training_arithmetic()


def run_one(corpus_config: Path, cpus: int, address: str | None) -> None:
    """One build of the corpus on `cpus` local CPUs or on the cluster at `address`; prints JSON."""
    work = Path(tempfile.mkdtemp(prefix="bench-scale-one-"))
    configure_prefect(work)  # before prefect is imported: the flow runs on a temporary server

    import ray

    import flows.build_dataset as flow_module
    from tasks.config import BuildConfig

    seconds = time_stages(flow_module)
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    config = BuildConfig.model_validate({**yaml.safe_load(corpus_config.read_text()), "output": str(work / "out")})
    started = time.perf_counter()
    flow_module.build_dataset(config)
    wall = time.perf_counter() - started
    ray.shutdown()
    print(json.dumps({"wall": wall, "stages": seconds}))


# -- 2. metadata -------------------------------------------------------------------------


METADATA_DOCS_PER_FILE = 3


def metadata(files: int, s3_uri: str | None) -> None:
    """Upload `files` tiny inputs to S3, then build and rebuild them in a child process."""
    from storage.store import open_store
    from tests.builds import tiny_corpus

    work = Path(tempfile.mkdtemp(prefix="bench-metadata-"))
    with s3_bucket(s3_uri, work) as s3_uri:
        root = f"{s3_uri.rstrip('/')}/metadata-{uuid.uuid4().hex[:8]}"
        corpus = tiny_corpus(work / "raw", files, METADATA_DOCS_PER_FILE, seed=0)
        inputs = open_store(f"{root}/raw")
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda path: inputs.put_file(path.name, path), sorted(corpus.iterdir())))
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.scale", "--metadata-one", f"{root}/raw", f"{root}/out"],
            stdout=subprocess.PIPE, text=True, check=True,  # the child's stderr shows, so a failure names its cause
        ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"\nmetadata: {files} input files x {METADATA_DOCS_PER_FILE} documents on {s3_uri}\n")
    print("| stage | build: driver S3 calls | build: wall s | rerun: driver S3 calls | rerun: wall s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    first, rerun = result["build"], result["rerun"]
    for name in first["stages"]:
        (s1, r1), (s2, r2) = first["stages"][name], rerun["stages"][name]
        print(f"| {name} | {sum(r1.values())} | {s1:.1f} | {sum(r2.values())} | {s2:.1f} |")
    for label, run in (("build", first), ("rerun", rerun)):
        calls = Counter()
        for _, requests in run["stages"].values():
            calls.update(requests)
        print(f"| **{label} total** | {sum(calls.values())} | {run['wall']:.1f} | | |" if label == "build"
              else f"| **rerun total** | | | {sum(calls.values())} | {run['wall']:.1f} |")
    print("\nby operation: build " + json.dumps(first["operations"]) + ", rerun " + json.dumps(rerun["operations"]))


@contextlib.contextmanager
def s3_bucket(s3_uri: str | None, work: Path) -> Iterator[str]:
    """`s3_uri`, or a fresh bucket on a SeaweedFS server started here (in `work`) for as long as
    the block runs; this process and its children talk to it through the AWS environment."""
    if s3_uri is not None:
        yield s3_uri
        return
    from tests.fixtures.s3 import SeaweedServer

    server = SeaweedServer(work / "seaweedfs")
    server.start()
    try:
        os.environ.update(server.env())
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        server.client().create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()


def metadata_one(inputs: str, output: str) -> None:
    """Build and rebuild the tiny corpus at `inputs` into `output`; prints JSON per stage."""
    work = Path(tempfile.mkdtemp(prefix="bench-metadata-one-"))
    configure_prefect(work)  # before prefect is imported: the flow runs on a temporary server

    from prefect import flow

    import flows.build_dataset as flow_module
    from tasks.fanout import ensure_ray
    from tests.builds import RequestCounter, tiny_config

    config = tiny_config(f"{inputs}/*.jsonl", output)
    counter = RequestCounter()
    stages: dict[str, list] = {}
    for name in STAGE_TASKS:
        task = getattr(flow_module, name)
        task.fn = _counted(task.fn, task.name, stages, counter)
    ensure_ray()
    flow(name="warm-up")(lambda: None)()
    result = {}
    for label in ("build", "rerun"):
        stages.clear()
        counter.take()
        started = time.perf_counter()
        flow_module.build_dataset(config)
        wall = time.perf_counter() - started
        operations = Counter()
        for _, requests in stages.values():
            operations.update(requests)
        result[label] = {"wall": wall, "stages": dict(stages), "operations": dict(operations)}
    print(json.dumps(result))


STAGE_TASKS = ("plan", "ingest", "exact_dedup", "near_dedup", "tokenizer", "tokenize", "write_manifest")


def _counted(fn, name: str, stages: dict[str, list], counter):
    """The stage body, recording its wall time and the driver's S3 calls under `name`."""

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        before = Counter(counter.operations)
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stages[name] = [time.perf_counter() - started, dict(counter.operations - before)]

    return counted


# -- 3. memory and files --------------------------------------------------------------------


def dedup_scale(docs: int, cpus: int, budget: int, doc_words: int) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.scale", "--dedup-one", str(docs), "--cpus", str(cpus), "--budget", str(budget),
            "--doc-words", str(doc_words),
        ],
        stdout=subprocess.PIPE, text=True, check=True,  # the child's stderr shows, so a failure names its cause
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"\ndedup at {docs:,} documents ({result['megabytes']:.0f} MB, {result['shards']} docs shards), {cpus} Ray workers, "
          f"budget {budget >> 20} MiB per task: exact {result['exact_ranges']} hash ranges, near "
          f"{result['bucket_partitions']} / {result['component_partitions']} partitions; "
          f"driver peak RSS {result['driver_peak_mib']} MiB (at start {result['driver_start_mib']} MiB)\n")
    print("| stage | step | tasks | files written | wall s | largest task peak RSS MiB | largest task growth MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for stage in ("exact", "near"):
        for step, (tasks, files, seconds, peak, growth) in result[stage].items():
            print(f"| {stage} | {step} | {tasks} | {files} | {seconds:.1f} | {peak} | {growth} |")


def rss_mib(field: str) -> int:
    """This process's VmRSS, or VmHWM (its peak), in MiB."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(f"{field}:")).split()[1]) // 1024


def reset_peak_rss() -> int:
    """Reset this process's VmHWM to its current RSS; returns that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mib("VmRSS")


def _write_chunk(store, log_words: float, chunk: tuple[int, int]) -> tuple[list, float]:
    """One docs shard of synthetic documents (benchmarks.dedup's corpus), seeded by its start."""
    from benchmarks.dedup import DOCS_PER_SHARD, write_shards, zipf_corpus

    start, count = chunk
    texts = zipf_corpus(count, seed=start, log_words=log_words)
    return write_shards(store, texts, first_ordinal=start // DOCS_PER_SHARD), sum(len(t.encode()) for t in texts) / 1e6


def dedup_one(docs: int, cpus: int, budget: int, doc_words: int) -> None:
    """Exact and near dedup of `docs` synthetic documents in this process; prints JSON."""
    import ray

    from benchmarks.dedup import DOCS_PER_SHARD, StageRun, sized
    from storage.store import LocalStore
    from tasks.config import MinHashConfig
    from tasks.exact_dedup import run_exact_dedup
    from tasks.near_dedup.steps import run_near_dedup
    from tasks.partitioning import EXACT_ROW_BYTES, batch_bytes, partitions

    store = LocalStore(tempfile.mkdtemp(prefix="bench-dedup-scale-"))
    chunks = [(start, min(DOCS_PER_SHARD, docs - start)) for start in range(0, docs, DOCS_PER_SHARD)]
    with ProcessPoolExecutor(cpus) as pool:  # generating 10M documents is the slow part
        written = list(pool.map(functools.partial(_write_chunk, store, math.log(doc_words)), chunks))
    shards = [shard for chunk_shards, _ in written for shard in chunk_shards]
    megabytes = sum(mb for _, mb in written)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    plan, sizes = [s.file for s in shards], {s.shard: s.size for s in shards}
    start_mib = reset_peak_rss()  # the driver's peak from here on: the stages, not the corpus it wrote
    ranges = partitions(docs, EXACT_ROW_BYTES, budget)
    exact = StageRun(store)
    run_exact_dedup(store, plan, sizes, ranges, budget, exact)
    cfg = sized(MinHashConfig(), docs, budget)
    near = StageRun(store)
    excluded = [dataclasses.replace(s, exclude=True) for s in shards]
    run_near_dedup(store, excluded, cfg, near, batch_bytes(budget), budget)
    steps = {}
    for label, run in (("exact", exact), ("near", near)):
        steps[label] = {
            step: [
                run.step_tasks[step], run.step_files[step], run.step_seconds[step], run.step_peak_mib[step],
                run.step_growth_mib[step],
            ]
            for step in run.step_seconds
        }
    print(json.dumps({
        "megabytes": megabytes, "shards": len(shards), "exact_ranges": ranges,
        "bucket_partitions": cfg.bucket_partitions, "component_partitions": cfg.component_partitions,
        "driver_start_mib": start_mib, "driver_peak_mib": rss_mib("VmHWM"), **steps,
    }))


def print_training_arithmetic() -> None:
    import torch

    from model.config import LlamaConfig
    from model.flops import flops_per_token, peak_bf16_flops
    from model.llama import Llama

    with torch.device("meta"):
        model = Llama(LlamaConfig.preset("tinyllama-1.1b"))
    per_token = flops_per_token(model, 2048)
    h100 = peak_bf16_flops("H100")
    print(f"\ntinyllama-1.1b at seq 2048: {per_token / 1e9:.2f} GFLOP per token; {TRAIN_TOKENS:.0e} tokens:")
    for mfu in (0.4, 0.5):
        hours = TRAIN_TOKENS * per_token / (h100 * mfu) / 3600
        print(f"  H100 at {mfu:.0%} MFU: {hours:,.0f} GPU-hours ({hours / 24 / 64:.1f} days on 64 GPUs)")


if __name__ == "__main__":
    main()
