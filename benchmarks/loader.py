"""Loader throughput: tokens/s per rank at seq_len 2048, from a local store, a warm cache and S3;
(--fetch) the bytes each node fetches per epoch, before and after node-aware loading; and
(--manifest) what the manifest costs a node's ranks to start and the build to write.

    .venv/bin/python -m benchmarks.loader [--tokens 64M] [--windows 5] [--batches 200]
    .venv/bin/python -m benchmarks.loader --fetch [--shards 1024] [--world-sizes 8,64] [--gpus-per-node 1,8]
    .venv/bin/python -m benchmarks.loader --manifest [--shards 240000] [--ranks-per-node 8,64]

--manifest writes the manifest of `shards` token shards (records only, no data) to a SeaweedFS
server started here, in both formats: the old whole JSON (every shard inline, as version 1 was)
and the header + shard table. Then it starts a node's ranks, processes sharing one cache folder
and started together: with the table, each builds its BlockLoader (the real path: header GET,
table fetched once per node, verified, keys checked, streams built); with the old JSON, each
GETs and parses it into pydantic records, as the old loader began (a lower bound of its start).
The old path is the same work on every rank, so it runs `--old-sample` ranks at a time and
counts the node's bytes as ranks x a rank's (this machine could not hold 64 copies in memory).
Bytes are what the S3 client received (GetObject bodies); memory is the rank's resident growth.

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
import gc
import hashlib
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.scale_model import S3Traffic, traffic_since
from model.data import BlockLoader, DataSource
from storage.build_layout import MANIFEST, SHARD_TABLE
from storage.manifest import (
    DocumentConvention, ObjectInfo, Record, ShardTable, SourceAccounting, TokenizerInfo, TokenShard, new_manifest, put_manifest, record_bytes,
)
from storage.store import open_object, open_store
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


HEADER = dict(
    name="fetch", build_id="simulated", config={}, config_hash="0" * 64, dtype="uint16",
    tokenizer=TokenizerInfo(key="unused", sha256="0" * 64, vocab_size=32000, bos_id=1, eos_id=2, trained=False),
)


def token_shards(shards: int) -> list[TokenShard]:
    """`shards` full 4M-token shards whose files do not exist (never read here), distinct checksums."""
    def info(prefix: str, ext: str) -> ObjectInfo:
        return ObjectInfo.model_construct(key=f"{prefix}.{ext}", size=2 * SHARD_TOKENS, sha256=hashlib.sha256(f"{prefix}.{ext}".encode()).hexdigest())

    prefixes = [f"tokens/web/{i // 4:06d}-{i % 4:04d}" for i in range(shards)]
    return [TokenShard.model_construct(prefix=p, source="web", documents=4000, tokens=SHARD_TOKENS, bin=info(p, "bin"),
                                       idx=info(p, "idx")) for p in prefixes]  # unvalidated: only the writers are timed


def sources_of(shards: int) -> dict[str, SourceAccounting]:
    return {"web": SourceAccounting(docs_in=shards, kept=shards, tokens=shards * SHARD_TOKENS)}


def metadata_manifest(folder: Path, shards: int) -> str:
    """A manifest of `shards` full 4M-token shards whose files do not exist (never read here)."""
    store = open_store(str(folder))
    put_manifest(store, MANIFEST, *new_manifest(ShardTable.of(token_shards(shards)), SHARD_TABLE, sources=sources_of(shards), **HEADER))
    return store.url(MANIFEST)


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


def fetch_table(shards: int, args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-fetch-") as tmp:
        manifest = metadata_manifest(Path(tmp) / "store", shards)
        for world_size in args.world_sizes:
            for gpus in args.gpus_per_node:
                if world_size % gpus:
                    continue
                nodes = world_size // gpus
                before = fetched_per_node(manifest, Path(tmp) / "cache", world_size, gpus, 1)
                after = fetched_per_node(manifest, Path(tmp) / "cache", world_size, gpus, nodes)
                rows.append((world_size, gpus, nodes, max(before), statistics.mean(after), max(after)))
    size = shards * SHARD_TOKENS * 2
    print(f"\nShards fetched per node per epoch: {shards} shards of {SHARD_TOKENS >> 20}M tokens "
          f"({size / 2**30:.0f} GiB as uint16), seq_len {SEQ_LEN}; x = fraction of the dataset\n")
    print("| world size | GPUs per node | nodes | before (max over nodes) | after (mean) | after (max) | ideal 1/nodes |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for world_size, gpus, nodes, before, mean_after, max_after in rows:
        print(f"| {world_size} | {gpus} | {nodes} | {before:.3f}x ({before * size / 2**30:,.2f} GiB) "
              f"| {mean_after:.3f}x | {max_after:.3f}x ({max_after * size / 2**30:,.2f} GiB) | {1 / nodes:.3f}x |")


class InlineManifest(Record):
    """The old format (version 1), the baseline: every shard inline in the JSON."""

    version: int = 1
    name: str
    build_id: str
    config: dict
    config_hash: str
    tokenizer: TokenizerInfo
    documents: DocumentConvention = DocumentConvention()
    dtype: str
    shards: list[TokenShard]
    sources: dict[str, SourceAccounting]


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def start_rank(uri: str, cache: Path, old: bool, barrier) -> tuple[float, float, int, int]:
    """One rank's start (a forked process): (seconds, CPU seconds, bytes received, resident growth)."""
    traffic, before = S3Traffic.in_this_process(), resident_bytes()
    received = traffic.snapshot()
    barrier.wait()
    started, cpu = time.perf_counter(), time.process_time()
    if old:
        store, key = open_object(uri)
        kept = InlineManifest.model_validate_json(store.get_bytes(key))
    else:
        kept = BlockLoader([DataSource(manifest=uri)], SEQ_LEN, seed=0, cache_dir=cache, prefetch=0)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    grown = resident_bytes() - before
    del kept
    return seconds, cpu, traffic_since(received, traffic.snapshot())["bytes_read"], grown


def start_node(uri: str, cache: Path, ranks: int, old: bool, at_once: int) -> list[tuple[float, float, int, int]]:
    """A node's ranks started together (`at_once` at a time), sharing the cache folder."""
    context = multiprocessing.get_context("fork")
    results = []
    with context.Manager() as manager:
        for first in range(0, ranks, at_once):
            count = min(at_once, ranks - first)
            barrier = manager.Barrier(count)
            with ProcessPoolExecutor(count, mp_context=context) as pool:
                results += pool.map(start_rank, [uri] * count, [cache] * count, [old] * count, [barrier] * count)
    return results


def timed(write) -> float:
    started = time.perf_counter()
    write()
    return time.perf_counter() - started


def manifest_table(shards: int, ranks_per_node: list[int], old_sample: int) -> None:
    records = token_shards(shards)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loader-manifest-") as tmp:
        work = Path(tmp)
        server = SeaweedServer(work / "seaweedfs")
        server.start()
        try:
            with aws_environment(server):
                server.client().create_bucket(Bucket="loader-bench")
                old_store, new_store = open_store("s3://loader-bench/old"), open_store("s3://loader-bench/new")

                def write_old():
                    old_store.put_bytes(MANIFEST, record_bytes(InlineManifest(shards=records, sources=sources_of(shards), **HEADER)))

                def write_new():
                    put_manifest(new_store, MANIFEST, *new_manifest(ShardTable.of(records), SHARD_TABLE, sources=sources_of(shards), **HEADER))

                writes = {"old": timed(write_old), "new": timed(write_new)}
                written = {"old": old_store.size(MANIFEST), "new": new_store.size(MANIFEST) + new_store.size(SHARD_TABLE)}
                records.clear()
                gc.collect()
                # the old path is the same work on every rank, whatever their number: one sample serves each row
                old_ranks = start_node(old_store.url(MANIFEST), work / "cache-old", old_sample, True, old_sample)
                for ranks in ranks_per_node:
                    new_ranks = start_node(new_store.url(MANIFEST), work / f"cache-{ranks}", ranks, False, ranks)
                    for name, started in (("old: whole JSON", old_ranks), ("new: header + table", new_ranks)):
                        seconds, cpu, received, grown = zip(*started)
                        node_bytes = sum(received) * ranks // len(started)  # old: ranks x a rank's
                        rows.append((ranks, name, node_bytes, statistics.median(seconds), max(seconds),
                                     statistics.median(cpu), max(grown)))
        finally:
            server.stop()

    print(f"\nManifest of {shards:,} token shards on SeaweedFS (S3)\n")
    print("| format | bytes written | write s |")
    print("| --- | ---: | ---: |")
    for name in ("old", "new"):
        print(f"| {name} | {written[name] / 2**20:,.1f} MiB | {writes[name]:.2f} |")
    print(f"| ratio old/new | {written['old'] / written['new']:.1f}x | {writes['old'] / writes['new']:.1f}x |")
    print(f"\nranks started together: all (new), {old_sample} (old); {os.cpu_count()} CPUs here\n")
    print("| ranks per node | manifest | bytes fetched per node | rank start s (median) | (max) | rank CPU s (median) | rank memory growth (max) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for ranks, name, node_bytes, median, slowest, cpu, grown in rows:
        print(f"| {ranks} | {name} | {node_bytes / 2**20:,.1f} MiB | {median:.2f} | {slowest:.2f} | {cpu:.2f} | {grown / 2**20:,.0f} MiB |")
    for old, new in zip(rows[::2], rows[1::2]):
        ratios = [old[i] / max(new[i], 1e-9) for i in (2, 3, 4, 5, 6)]
        print(f"| {old[0]} | ratio old/new | " + " | ".join(f"{r:,.1f}x" for r in ratios) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=parse_tokens, default=parse_tokens("64M"), help="dataset size")
    parser.add_argument("--windows", type=int, default=5, help="timed windows after the first")
    parser.add_argument("--batches", type=int, default=200, help="micro-batches per window")
    parser.add_argument("--fetch", action="store_true", help="simulate the bytes fetched per node instead")
    parser.add_argument("--shards", type=int, help="shards in the simulated dataset (--fetch: 1024, --manifest: 240,000)")
    parser.add_argument("--world-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[8, 64])
    parser.add_argument("--gpus-per-node", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8])
    parser.add_argument("--manifest", action="store_true", help="time the manifest's write and the ranks' start instead")
    parser.add_argument("--ranks-per-node", type=lambda t: [int(x) for x in t.split(",")], default=[8, 64])
    parser.add_argument("--old-sample", type=int, default=2, help="--manifest: old-format ranks run at once")
    args = parser.parse_args()
    if args.fetch:
        fetch_table(args.shards or 1024, args)
        return
    if args.manifest:
        manifest_table(args.shards or 240_000, args.ranks_per_node, args.old_sample)
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
