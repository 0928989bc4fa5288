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
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.build import _timed
from benchmarks.tokenize import parse_bytes
from deployments.settings import configure_prefect

STAGES = ("plan", "ingest", "exact_dedup", "near_dedup", "tokenizer", "tokenize", "write_manifest")
H100_PEAK_BF16 = 989e12
TRAIN_TOKENS = 3e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_bytes, default=parse_bytes("32M"))
    parser.add_argument("--no-cluster", action="store_true", help="Skip the 2-node cluster run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    configure_prefect(work)  # before prefect is imported: the flow runs on a temporary server

    import ray

    import flows.build_dataset as flow_module
    from tasks.config import BuildConfig
    from tasks.sample_corpus import make_sample_corpus

    corpus = make_sample_corpus(work / "raw", target_bytes=args.bytes)
    raw_mb = sum(s["bytes"] for s in corpus["sources"].values()) / 1e6
    base = yaml.safe_load(Path(corpus["config"]).read_text())
    seconds: dict[str, float] = {}
    for name in STAGES:
        stage = getattr(flow_module, name)
        stage.fn = _timed(stage.fn, stage.name, seconds)

    setups = [("local, 1 CPU", 1, None), ("local, 2 CPUs", 2, None)]
    cluster = None
    if not args.no_cluster:
        from tests.reliability.cluster import RayCluster  # the test suite's real `ray start` cluster

        cluster = RayCluster()
    results = []
    try:
        if cluster is not None:
            cluster.start_node(head=True)
            cluster.start_node()
            setups.append(("2-node cluster, 1 CPU each", 2, cluster.address))
        for label, cores, address in setups:
            ray.shutdown()
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
            config = BuildConfig.model_validate({**base, "output": str(work / f"out-{len(results)}")})
            seconds.clear()
            started = time.perf_counter()
            flow_module.build_dataset(config)
            wall = time.perf_counter() - started
            results.append({"setup": label, "cores": cores, "wall": wall, "stages": dict(seconds)})
            print(f"{label}: {wall:.1f} s", flush=True)
    finally:
        ray.shutdown()
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
    print("\n" + json.dumps({"raw_mb": raw_mb, "results": results}))
    print_training_arithmetic()


def print_training_arithmetic() -> None:
    import torch

    from model.config import LlamaConfig
    from model.flops import flops_per_token
    from model.llama import Llama

    with torch.device("meta"):
        model = Llama(LlamaConfig.preset("tinyllama-1.1b"))
    per_token = flops_per_token(model, 2048)
    print(f"\ntinyllama-1.1b at seq 2048: {per_token / 1e9:.2f} GFLOP per token; {TRAIN_TOKENS:.0e} tokens:")
    for mfu in (0.4, 0.5):
        hours = TRAIN_TOKENS * per_token / (H100_PEAK_BF16 * mfu) / 3600
        print(f"  H100 at {mfu:.0%} MFU: {hours:,.0f} GPU-hours ({hours / 24 / 64:.1f} days on 64 GPUs)")


if __name__ == "__main__":
    main()
