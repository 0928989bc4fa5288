"""Stage 3: exact deduplication.

Each docs shard hashes its texts into `partitions` hash ranges (one Ray task per shard);
each hash range then finds repeated hashes across all shards (one Ray task per range) and
keeps the first occurrence in plan order, i.e. the smallest document id. Removed ids are
written per docs shard, so the tokenize stage reads only its own.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import xxhash

from storage.manifest import Receipt
from storage.store import Store, join_key
from tasks.fanout import run_shards
from tasks.ingest import docs_key
from tasks.parquet_io import read_table, write_table
from tasks.plan import Build, PlannedFile, ordinal_of
from tasks.reporting import progress, stage_table
from tasks.stage import stage_task

PARTITIONS = 16
HASH_SCHEMA = pa.schema([("id", pa.int64()), ("hash", pa.binary(16))])
REMOVED_SCHEMA = pa.schema([("id", pa.int64()), ("kept_id", pa.int64())])


def hashes_key(partition: int, shard: str) -> str:
    return join_key("dedup/exact/hashes", f"{partition:04d}", f"{shard}.parquet")


def removed_prefix(shard: str) -> str:
    return join_key("dedup/exact/removed", shard) + "/"


def hash_shard(store: Store, file: PlannedFile) -> Receipt:
    docs = read_table(store, docs_key(file), columns=["id", "text"])
    ids = docs.column("id").to_numpy()
    digests = [xxhash.xxh3_128_digest(text.encode("utf-8")) for text in docs.column("text").to_pylist()]
    partition_of = np.array([int.from_bytes(d[:8], "little") % PARTITIONS for d in digests], dtype=np.int64)
    outputs = []
    for partition in range(PARTITIONS):
        rows = np.flatnonzero(partition_of == partition)
        table = pa.table(
            {"id": pa.array(ids[rows], pa.int64()), "hash": pa.array([digests[i] for i in rows], pa.binary(16))},
            schema=HASH_SCHEMA,
        )
        outputs.append(write_table(store, hashes_key(partition, file.shard), table))
    return Receipt(stage="exact-hash", shard=file.shard, outputs=outputs, counts={"documents": len(ids)})


def find_duplicates(store: Store, plan: list[PlannedFile], partition: int) -> Receipt:
    """Within one hash range: every document whose hash was seen at a smaller id is removed."""
    tables = [read_table(store, hashes_key(partition, f.shard)) for f in plan]
    table = pa.concat_tables(tables).sort_by([("hash", "ascending"), ("id", "ascending")])
    ids = table.column("id").to_numpy()
    digests = np.frombuffer(b"".join(table.column("hash").to_pylist()), dtype=np.uint64).reshape(-1, 2)
    first = np.ones(len(ids), dtype=bool)  # the first (smallest id) of each run of equal hashes
    first[1:] = (digests[1:] != digests[:-1]).any(axis=1)
    group_first = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    removed_ids, kept_ids = ids[~first], ids[group_first[~first]]
    shards = ordinal_of(removed_ids)
    outputs, per_source = [], Counter()
    for ordinal in np.unique(shards):
        rows = shards == ordinal
        file = plan[int(ordinal)]
        per_source[file.source] += int(rows.sum())
        table = pa.table({"id": removed_ids[rows], "kept_id": kept_ids[rows]}, schema=REMOVED_SCHEMA)
        outputs.append(write_table(store, removed_prefix(file.shard) + f"p{partition:04d}.parquet", table))
    counts = {f"exact_dup:{source}": n for source, n in sorted(per_source.items())}
    counts["exact_dup"] = len(removed_ids)
    return Receipt(stage="exact-dedup", shard=f"p{partition:04d}", outputs=outputs, counts=counts)


def removed_ids(store: Store, file: PlannedFile) -> np.ndarray:
    """Ids of one docs shard that exact dedup removed (empty when the stage did not run)."""
    keys = list(store.list(removed_prefix(file.shard)))
    if not keys:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([read_table(store, k, columns=["id"]).column("id").to_numpy() for k in keys])


@stage_task("exact-dedup")
def exact_dedup(build: Build) -> dict[str, int | float]:
    store, plan = build.store, build.plan
    hashed = run_shards(
        "exact-hash", store, plan, lambda f: f.shard, lambda f: hash_shard(store, f),
        on_progress=progress("exact-hash", build.config.name), max_in_flight=build.config.parallelism,
    )
    stage_table("exact-hash", build.config.name, hashed)
    receipts = run_shards(
        "exact-dedup", store, range(PARTITIONS), lambda p: f"p{p:04d}",
        lambda p: find_duplicates(store, plan, p),
        on_progress=progress("exact-dedup", build.config.name), max_in_flight=build.config.parallelism,
    )
    return stage_table("exact-dedup", build.config.name, receipts)
