"""Stage 3: exact deduplication.

Each batch of consecutive docs shards hashes its texts (xxh3-128) into hash ranges, one object
with a partition per range for the whole batch (one Ray task per batch); each hash range then
reads its partition of every batch, through merge levels once there are more batches than
tasks.shuffle.MERGE_FAN_IN (so its reads grow with the tasks, not batches x ranges), finds
repeated hashes (one Ray task per range) and keeps the first occurrence in plan order, i.e.
the smallest document id. The number of ranges is sized from the documents so
one range task stays inside `task_memory_bytes`. Each range writes its removed ids as one
object with a partition per block of plan files, shuffled through merge levels to one merge
task per block (tasks.removals).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import xxhash

from storage import build_layout as layout
from storage.build_layout import batch_name, partition_name
from storage.manifest import ShardResult, SourceAccounting
from storage.stage_summary import StageSummary
from storage.store import Store
from tasks.parquet_io import read_table, write_partitions
from tasks.partitioning import EXACT_ROW_BYTES, batch_bytes, batches, ingested_documents, partitions, rows_by_partition
from tasks.plan import Build, PlannedFile, SourceRanges
from tasks.removals import exact_removed_ids, merge_stage, write_removed
from tasks.shuffle import MergedShuffle, merged_shuffle
from tasks.stage import EXACT_DEDUP, Run, Stage, stage_task
from tasks.step_result import StepResult, StepRun
from tasks.stage_counts import ExactDupCounts, HashedCounts

HASH_SCHEMA = pa.schema([("id", pa.int64()), ("hash", pa.binary(16))])


def text_digests(texts: pa.Array) -> np.ndarray:
    """xxh3-128 of each text's UTF-8 bytes, as a (documents, 16) uint8 array, hashed straight
    from the arrow buffers (no Python strings)."""
    texts = texts.cast(pa.large_string()) if texts.type == pa.string() else texts
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    data = memoryview(texts.buffers()[2] or b"")
    digest = xxhash.xxh3_128_digest
    joined = b"".join(digest(data[start:end]) for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()))
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, 16)


@dataclass(frozen=True)
class FileBatch:
    """Consecutive plan files whose docs shards one hashing task reads: its own slice of the plan."""

    index: int
    files: tuple[PlannedFile, ...]


def _batch_name(batch: FileBatch) -> str:
    return batch_name(batch.index)


def hash_batch(store: Store, ranges: int, batch: FileBatch) -> ShardResult:
    """The (id, hash) rows of a batch of docs shards, a partition per hash range in one object."""
    ids, digests = [], []
    for file in batch.files:
        docs = read_table(store, layout.docs(file.source, file.shard), columns=["id", "text"])
        ids.append(docs.column("id").to_numpy())
        digests.append(text_digests(docs.column("text").combine_chunks()))
    ids, digests = np.concatenate(ids), np.concatenate(digests)
    range_of = digests[:, :8].copy().view("<u8").reshape(-1) % np.uint64(ranges)
    tables = []
    for rows in rows_by_partition(range_of, ranges):
        hashes = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(rows), [None, pa.py_buffer(digests[rows].tobytes())])
        tables.append(pa.table({"id": pa.array(ids[rows], pa.int64()), "hash": hashes}, schema=HASH_SCHEMA))
    outputs = [write_partitions(store, layout.exact_hashes(batch.index), tables)]
    return ShardResult(outputs=outputs, counts=HashedCounts(documents=len(ids)))


def find_duplicates(store: Store, sources: SourceRanges, hashes: MergedShuffle, removed_ids: MergedShuffle, partition: int) -> ShardResult:
    """Within one hash range: every document whose hash was seen at a smaller id is removed."""
    table = hashes.read(store, partition).sort_by([("hash", "ascending"), ("id", "ascending")])
    ids = table.column("id").to_numpy()
    hashes = table.column("hash").combine_chunks()
    digests = np.frombuffer(hashes.buffers()[1], dtype=np.uint64)[2 * hashes.offset : 2 * (hashes.offset + len(hashes))]
    digests = digests.reshape(-1, 2)
    first = np.ones(len(ids), dtype=bool)  # the first (smallest id) of each run of equal hashes
    first[1:] = (digests[1:] != digests[:-1]).any(axis=1)
    group_first = np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))
    removed, kept = ids[~first], ids[group_first[~first]]
    outputs = [write_removed(store, removed_ids, partition, removed, kept)]
    accounting = {source: SourceAccounting(exact_dup=n) for source, n in sources.count(removed).items()}
    return ShardResult(outputs=outputs, counts=ExactDupCounts(exact_dup=len(removed)), sources=accounting)


def run_exact_dedup(
    store: Store, plan: list[PlannedFile], sizes: dict[str, int], ranges: int, budget: int, run: Run
) -> StageSummary:
    """Hash every batch of docs shards, find the duplicates of each hash range, then merge the
    removed ids per block of plan files; returns the summary of the second step (its receipts
    carry the per-source exact_dup counts). Each task is given its own slice of the plan, or
    a few values for all of it, never the plan."""
    members = batches([sizes[f.shard] for f in plan], batch_bytes(budget))
    file_batches = [FileBatch(i, tuple(plan[r.start : r.stop])) for i, r in enumerate(members)]
    run(Stage("exact-hash", file_batches, _batch_name, partial(hash_batch, store, ranges), (layout.EXACT_HASHES,)))
    hashes = merged_shuffle("exact-runs-hashes", partial(layout.exact_runs, "hashes"), layout.exact_hashes, HASH_SCHEMA, len(members), ranges)
    for stage in hashes.stages(store):
        run(stage)
    removed_ids = exact_removed_ids(ranges, len(plan))
    find = partial(find_duplicates, store, SourceRanges.of(plan), hashes, removed_ids)
    found = run(Stage(EXACT_DEDUP, list(range(ranges)), partition_name, find, (layout.EXACT_REMOVED,)))
    for stage in removed_ids.stages(store):
        run(stage)
    run(merge_stage("exact-merge", store, removed_ids, layout.exact_merged, layout.EXACT_MERGED))
    return found


@stage_task(EXACT_DEDUP)
def exact_dedup(build: Build, ingested: StepResult) -> StepResult:
    store, config = build.store, build.config
    documents, sizes = ingested_documents(ingested.summary(store))
    budget = config.task_memory_bytes
    ranges = partitions(documents, EXACT_ROW_BYTES, budget, config.dedup.exact_partitions)
    run = StepRun(EXACT_DEDUP, store, config)
    run_exact_dedup(store, build.plan, sizes, ranges, budget, run)
    return run.result()
