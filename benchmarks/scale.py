"""Capacity model inputs: per-core throughput of each build stage on 1 CPU, 2 CPUs and a 2-node
Ray cluster (one CPU per node, both on this machine), plus the TinyLlama training arithmetic.

    .venv/bin/python -m benchmarks.scale [--bytes 32M] [--no-cluster]

One sample corpus, one process: for each setup Ray is (re)started with that many CPUs, or joined
as a 2-node cluster started with `ray start`, and the same config is built into a fresh folder.
A stage's time is the wall time of its Prefect task's body (as in benchmarks/build.py); its
per-core rate is raw MB / (seconds x cores). The tokenizer training sample is capped, so its
time is a fixed cost, not a per-byte one. docs/scaling.md turns the table into a capacity model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
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
    parser.add_argument("--one", nargs=3, metavar=("CORPUS_YAML", "CPUS", "RAY_ADDRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(Path(args.one[0]), int(args.one[1]), args.one[2] if args.one[2] != "-" else None)

    from tasks.sample_corpus import make_sample_corpus

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
                env=env, capture_output=True, text=True, check=True,
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
