"""Loader throughput: tokens/s per rank at seq_len 2048, from a local store, a warm cache and S3;
and (--fetch) the bytes each node fetches per epoch, before and after node-aware loading.

    .venv/bin/python -m benchmarks.loader [--tokens 64M] [--windows 5] [--batches 200]
    .venv/bin/python -m benchmarks.loader --fetch [--shards 1024] [--world-sizes 8,64] [--gpus-per-node 1,8]

--fetch simulates: a manifest of `shards` 4M-token shards (no data: the loader's plan is a pure
function of the manifest), and for each world size and GPUs per node, the shards whose tokens
the blocks of one epoch of each node's ranks touch, i.e. what the node's shared cache fetches,
with the sequence of one data node (before) and of `world size / GPUs per node` nodes (after).

Builds a synthetic dataset (random tokens, 4M-token shards as the build flow writes them),
once in a local folder and once on a SeaweedFS S3 server started here, then times
BlockLoader.next_batch(8) (micro-batches of 8 blocks) as rank 0 of 1 and of 8 ranks:

- local store: shards read in place through memory maps;
- S3, cold cache: an empty cache, so the first batch and window include downloading and
  verifying the shards (all of them: this dataset is smaller than one shuffle window);
- S3, warm cache: a new loader on the cache the cold row filled (each shard verified by
  sha256 again when first opened, in the background).

Tokens are counted as training tokens (seq_len per block). Each loader times its first window
of micro-batches, then `windows` more: "steady" is their median. Target: >= 2M tokens/s per
rank from cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from model.data import BlockLoader, DataSource
from storage.manifest import DatasetManifest, ObjectInfo, SourceAccounting, TokenizerInfo, TokenShard, write_record
from storage.store import open_store
from tests.fixtures.s3 import SeaweedServer, aws_environment
from tests.model.synthetic import write_synthetic_build

SEQ_LEN = 2048
MICRO_BATCH = 8
SHARD_TOKENS = 4 << 20
TARGET = 2e6


def parse_tokens(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("KMGkmg")) * scale)


def documents(total_tokens: int, seed: int) -> list[int]:
    """Document lengths around 1k tokens, like web text, adding up to about `total_tokens`."""
    lengths = np.random.default_rng(seed).integers(200, 2000, size=total_tokens // 1100 + 1)
    return lengths.tolist()


def time_loader(manifest: str, cache_dir: Path, world_size: int, windows: int, batches: int) -> tuple[float, float, float]:
    """One fresh loader as rank 0: (seconds to its first batch, tokens/s of its first window,
    median tokens/s of the `windows` windows after it), a window being `batches` micro-batches."""
    started = time.perf_counter()
    loader = BlockLoader([DataSource(manifest=manifest)], SEQ_LEN, seed=0, rank=0,
                         world_size=world_size, cache_dir=cache_dir)
    loader.next_batch(MICRO_BATCH)
    first_batch = time.perf_counter() - started
    rates = []
    for _ in range(windows + 1):
        started = time.perf_counter()
        for _ in range(batches):
            loader.next_batch(MICRO_BATCH)
        rates.append(batches * MICRO_BATCH * SEQ_LEN / (time.perf_counter() - started))
    loader.close()
    return first_batch, rates[0], statistics.median(rates[1:])


def metadata_manifest(folder: Path, shards: int) -> str:
    """A manifest of `shards` full 4M-token shards whose files do not exist (never read here)."""
    fake = ObjectInfo(key="unused", size=0, sha256="0" * 64)
    manifest = DatasetManifest(
        name="fetch", build_id="simulated", config={}, config_hash="0" * 64, dtype="uint16",
        tokenizer=TokenizerInfo(key="unused", sha256="0" * 64, vocab_size=32000, bos_id=1, eos_id=2, trained=False),
        shards=[TokenShard(prefix=f"tokens/web/web-{i:06d}", source="web", documents=1, tokens=SHARD_TOKENS,
                           bin=fake, idx=fake) for i in range(shards)],
        sources={"web": SourceAccounting(docs_in=shards, kept=shards, tokens=shards * SHARD_TOKENS)},
    )
    store = open_store(str(folder))
    write_record(store, "manifest.json", manifest)
    return store.url("manifest.json")


def fetched_per_node(manifest: str, cache: Path, world_size: int, gpus_per_node: int, data_nodes: int) -> list[float]:
    """Per physical node: the fraction of the dataset's shards its ranks touch in one epoch."""
    loaders = [BlockLoader([DataSource(manifest=manifest)], SEQ_LEN, seed=0, rank=r, world_size=world_size,
                           cache_dir=cache, nodes=data_nodes, prefetch=0) for r in range(world_size)]
    blocks = loaders[0].sources[0].num_blocks
    total = len(loaders[0].sources[0].shards)
    shares = []
    for node in range(world_size // gpus_per_node):
        touched: set[int] = set()
        for loader in loaders[node * gpus_per_node : (node + 1) * gpus_per_node]:
            positions = np.arange(loader.offset, blocks, world_size)
            _, _, first, last = loader._layout(positions)
            for lo, hi in {(int(a), int(b)) for a, b in zip(first, last)}:
                touched.update(range(lo, hi + 1))
        shares.append(len(touched) / total)
    for loader in loaders:
        loader.close()
    return shares


def fetch_table(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-fetch-") as tmp:
        manifest = metadata_manifest(Path(tmp) / "store", args.shards)
        for world_size in args.world_sizes:
            for gpus in args.gpus_per_node:
                if world_size % gpus:
                    continue
                nodes = world_size // gpus
                before = fetched_per_node(manifest, Path(tmp) / "cache", world_size, gpus, 1)
                after = fetched_per_node(manifest, Path(tmp) / "cache", world_size, gpus, nodes)
                rows.append((world_size, gpus, nodes, max(before), statistics.mean(after), max(after)))
    size = args.shards * SHARD_TOKENS * 2
    print(f"\nShards fetched per node per epoch: {args.shards} shards of {SHARD_TOKENS >> 20}M tokens "
          f"({size / 2**30:.0f} GiB as uint16), seq_len {SEQ_LEN}; x = fraction of the dataset\n")
    print("| world size | GPUs per node | nodes | before (max over nodes) | after (mean) | after (max) | ideal 1/nodes |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for world_size, gpus, nodes, before, mean_after, max_after in rows:
        print(f"| {world_size} | {gpus} | {nodes} | {before:.3f}x ({before * size / 2**30:,.2f} GiB) "
              f"| {mean_after:.3f}x | {max_after:.3f}x ({max_after * size / 2**30:,.2f} GiB) | {1 / nodes:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=parse_tokens, default=parse_tokens("64M"), help="dataset size")
    parser.add_argument("--windows", type=int, default=5, help="timed windows after the first")
    parser.add_argument("--batches", type=int, default=200, help="micro-batches per window")
    parser.add_argument("--fetch", action="store_true", help="simulate the bytes fetched per node instead")
    parser.add_argument("--shards", type=int, default=1024, help="--fetch: shards in the simulated dataset")
    parser.add_argument("--world-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[8, 64])
    parser.add_argument("--gpus-per-node", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8])
    args = parser.parse_args()
    if args.fetch:
        fetch_table(args)
        return

    lengths = {"web": documents(args.tokens, seed=0)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        work = Path(tmp)
        local = write_synthetic_build(str(work / "store"), "bench", lengths, 32000, 0, SHARD_TOKENS)
        server = SeaweedServer(work / "seaweedfs")
        server.start()
        try:
            with aws_environment(server):
                server.client().create_bucket(Bucket="loader-bench")
                remote = write_synthetic_build("s3://loader-bench", "bench", lengths, 32000, 0, SHARD_TOKENS)
                for world_size in (1, 8):
                    cases = [
                        ("local store (mmap in place)", local, work / "unused-cache"),
                        ("S3, cold cache", remote, work / f"cache-{world_size}"),
                        ("S3, warm cache", remote, work / f"cache-{world_size}"),  # filled by the row above
                    ]
                    for name, manifest, cache in cases:
                        rows.append((name, world_size, *time_loader(manifest, cache, world_size, args.windows, args.batches)))
        finally:
            server.stop()

    window_tokens = args.batches * MICRO_BATCH * SEQ_LEN
    print(f"\nBlockLoader, seq_len {SEQ_LEN}, micro-batches of {MICRO_BATCH} blocks, {args.tokens / 1e6:.0f}M tokens "
          f"in {SHARD_TOKENS >> 20}M-token shards; windows of {window_tokens / 1e6:.1f}M tokens per rank\n")
    print("| data | rank 0 of | first batch (s) | first window, tokens/s | steady, tokens/s per rank (median) | >= 2M/s |")
    print("| --- | ---: | ---: | ---: | ---: | :---: |")
    for name, world_size, first_batch, first_window, steady in rows:
        print(f"| {name} | {world_size} | {first_batch:.2f} | {first_window / 1e6:,.1f}M | {steady / 1e6:,.1f}M "
              f"| {'yes' if steady >= TARGET else 'no'} |")


if __name__ == "__main__":
    main()
