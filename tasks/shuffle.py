"""Shuffles whose reads grow with their tasks: merge levels between map and reduce tasks.

Every shuffle of the build (exact dedup's hashes, near dedup's bands, candidates, shingles and
components) writes one `.parts` object per map task with a partition per reduce partition
(tasks.parquet_io). A reduce task reading its partition of every map object would make
2 x maps x reduce tasks range reads, which grows as (data / budget)^2: both counts are sized
from the data and the budget. `MergedShuffle` puts merge levels in between, so a reduce task
reads at most `fan_in` objects and the reads grow as (maps + reduce tasks) x log(maps), like
the tasks themselves.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from storage.build_layout import merge_run
from storage.manifest import ShardResult
from storage.store import Store
from tasks.parquet_io import READ_THREADS, parse_partition, partition_offsets, read_partition_of_each, write_partitions
from tasks.stage import Stage
from tasks.stage_counts import ShuffleMergeCounts

MERGE_FAN_IN = 16  # runs a merge task concatenates, and blocks it cuts its block into
SPILL_PIECE_BYTES = 64 << 20  # one range read of a spill, SPILL_PIECES_IN_FLIGHT at a time:
SPILL_PIECES_IN_FLIGHT = 4  # at most 256 MiB held, however large the span


def _split(items: range, parts: int) -> list[range]:
    """A range cut into min(parts, len) consecutive ranges of about equal length."""
    count = min(parts, len(items))
    bounds = [items.start + len(items) * i // count for i in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass(frozen=True)
class MergedShuffle:
    """A shuffle whose reduce tasks read at most `fan_in` objects: merge levels between its map
    objects and its reduce tasks, derived from a few numbers (no list per task to pass).

    Level 0 is the map tasks' objects, a partition per reduce partition; a reduce task reads
    `span` consecutive partitions. A task of level l + 1 reads one block's share of `fan_in`
    consecutive runs of level l (an offsets read, then the bytes in pieces, spilled to local
    disk) and writes their concatenation, partition by partition in map order, as one object for
    a block of consecutive reduce tasks that is a 1 / `fan_in` cut of the level-l block. So a
    reduce task sees the rows of every map object in map order, as if it read them directly, and
    an object holds about one map object's rows at every level (`fan_in` times the maps, 1 /
    `fan_in` of the partitions), at most one reduce task's rows once blocks are single reduce
    tasks. Levels go on until at most `fan_in` runs are left. Range reads: at most 2 x fan_in
    per object of a level (each level writes at most maps + reduce tasks objects), over
    ceil(log_fan_in maps) - 1 levels, and 2 x fan_in per reduce task: O((M + R) log M), where
    every reduce task reading every map object is 2 x M x R. The price: each level rewrites the
    shuffle's bytes once (a larger fan-in: fewer levels, more reads per object)."""

    step: str  # its merge steps are `<step>-lNN`
    runs_folder: Callable[[int], str]  # a merge level's folder (storage.build_layout)
    map_key: Callable[[int], str]  # a map task's object
    schema: pa.Schema
    maps: int
    partitions: int
    span: int  # partitions a reduce task reads
    fan_in: int  # runs a merge task concatenates, and blocks it cuts its block into

    @property
    def reducers(self) -> int:
        return -(-self.partitions // self.span)

    @property
    def levels(self) -> int:
        """Merge levels until at most `fan_in` runs are left for a reduce task to read."""
        level = 0
        while self.runs(level) > self.fan_in:
            level += 1
        return level

    def runs(self, level: int) -> int:
        return -(-self.maps // self.fan_in**level)

    def blocks(self, level: int) -> list[tuple[int, range]]:
        """Each block of the level: (its block at level - 1, the reduce tasks it holds)."""
        blocks = [(0, range(self.reducers))]
        for _ in range(level):
            blocks = [(parent, part) for parent, (_, reducers) in enumerate(blocks) for part in _split(reducers, self.fan_in)]
        return blocks

    def partitions_of(self, reducers: range) -> range:
        """The partitions of some consecutive reduce tasks: a block's partitions, in order."""
        return range(reducers.start * self.span, min(reducers.stop * self.span, self.partitions))

    def key(self, level: int, run: int, block: int) -> str:
        return self.map_key(run) if level == 0 else merge_run(self.runs_folder(level), run, block)

    def merges(self, level: int) -> list[tuple[int, int, int]]:
        """The tasks of a level >= 1: (level, run, block)."""
        return [(level, run, block) for block in range(len(self.blocks(level))) for run in range(self.runs(level))]

    def stages(self, store: Store) -> list[Stage]:
        """A Stage per merge level, to run in order after the map tasks and before the reduce tasks."""
        merge = partial(merge_runs, store, self)
        return [
            Stage(f"{self.step}-l{level:02d}", self.merges(level), _merge_name, merge, (self.runs_folder(level),))
            for level in range(1, self.levels + 1)
        ]

    def sources(self, first_partition: int) -> tuple[list[str], int]:
        """What a reduce task reads, by its first partition: the last level's objects of its
        block (at most `fan_in`), and where its partitions begin in them."""
        level, reducer = self.levels, first_partition // self.span
        blocks = self.blocks(level)
        block = next(b for b, (_, reducers) in enumerate(blocks) if reducer in reducers)
        keys = [self.key(level, run, block) for run in range(self.runs(level))]
        return keys, first_partition - self.partitions_of(blocks[block][1]).start

    def read(self, store: Store, partition: int) -> pa.Table:
        """One partition's rows of every map object, in map order, from the last level (a
        reduce task of span 1)."""
        keys, at = self.sources(partition)
        tables = read_partition_of_each(store, keys, at, self.schema)
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


def merged_shuffle(
    step: str, runs_folder: Callable[[int], str], map_key: Callable[[int], str], schema: pa.Schema,
    maps: int, partitions: int, span: int = 1,
) -> MergedShuffle:
    """A MergedShuffle with this module's MERGE_FAN_IN (read when called)."""
    return MergedShuffle(step, runs_folder, map_key, schema, maps, partitions, span, MERGE_FAN_IN)


def _merge_name(merge: tuple[int, int, int]) -> str:
    _, run, block = merge
    return f"r{run:06d}-k{block:06d}"


def merge_runs(store: Store, shuffle: MergedShuffle, merge: tuple[int, int, int]) -> ShardResult:
    """One run and block of a merge level: the block's partitions of up to `fan_in` runs of
    the level below (spilled to local disk), concatenated partition by partition in map order,
    so rows keep their order."""
    level, run, block = merge
    parent, reducers = shuffle.blocks(level)[block]
    partitions = shuffle.partitions_of(reducers)
    first = partitions.start - shuffle.partitions_of(shuffle.blocks(level - 1)[parent][1]).start
    below = range(run * shuffle.fan_in, min((run + 1) * shuffle.fan_in, shuffle.runs(level - 1)))
    keys = [shuffle.key(level - 1, r, parent) for r in below]
    with tempfile.TemporaryFile() as spill:
        where = spill_span(store, keys, range(first, first + len(partitions)), spill)

        def tables():  # one partition's rows at a time
            for offset in range(len(partitions)):
                names = [f"{store.url(key)}: partition {first + offset}" for key in keys]
                yield pa.concat_tables(list(spilled_tables(spill, where, offset, names, shuffle.schema)))

        output = write_partitions(store, shuffle.key(level, run, block), tables(), len(partitions))
    return ShardResult(outputs=[output], counts=ShuffleMergeCounts(runs=len(keys), partitions=len(partitions)))


def spill_span(store: Store, keys: Sequence[str], span: range, spill: BinaryIO) -> list[np.ndarray]:
    """The span's partitions of each object appended to a local file, in object order; each
    object's partition offsets in the file. Read in pieces of at most SPILL_PIECE_BYTES, a few
    at a time, so memory holds a few pieces however large the span: a merge task's inputs can be
    a verify span's whole shingles."""
    with ThreadPoolExecutor(min(READ_THREADS, max(len(keys), 1))) as pool:
        headers = list(pool.map(lambda key: partition_offsets(store, key, span.start, span.stop), keys))
        where, at = [], spill.tell()
        for offsets in headers:
            where.append(np.asarray(offsets, dtype=np.int64) - offsets[0] + at)
            at += offsets[-1] - offsets[0]
        pieces = [
            (key, start, min(SPILL_PIECE_BYTES, offsets[-1] - start))
            for key, offsets in zip(keys, headers)
            for start in range(offsets[0], offsets[-1], SPILL_PIECE_BYTES)
        ]
        for first in range(0, len(pieces), SPILL_PIECES_IN_FLIGHT):
            for data in pool.map(lambda piece: store.get_range(*piece), pieces[first : first + SPILL_PIECES_IN_FLIGHT]):
                spill.write(data)
    spill.flush()
    return where


def spilled_tables(spill: BinaryIO, where: Sequence[np.ndarray], offset: int, names: Sequence[str], schema: pa.Schema) -> Iterator[pa.Table]:
    """The span's `offset`-th partition of each object, from the spill file, in object order."""
    for at, name in zip(where, names):
        start, end = int(at[offset]), int(at[offset + 1])
        yield parse_partition(os.pread(spill.fileno(), end - start, start), schema, name)
