"""Stage 4: near-duplicate removal, MinHash LSH over docs shards, as small fan-out steps.

Every step is a Stage (tasks.stage): independent tasks, one per batch of docs shards or per
partition, that read and write parquet on the build store; `run` (tasks.fanout.run_stage)
runs them with receipts, so a rerun redoes only unfinished tasks. No task holds all
documents, all edges or all ids: P = `bucket_partitions` and Q = `component_partitions`
(derived from the document count so a task stays inside the memory budget) bound what one
task sees. A batch is a run of consecutive docs shards of about `batch_bytes`. Every shuffle
writes one `.parts` object per map task, a partition per reduce task, which reads its
partition of each with range reads (tasks.parquet_io): a step writes as many objects as it
has tasks, never tasks x partitions. Every shuffle goes through merge levels
(tasks.shuffle.MergedShuffle, steps `near-runs-<shuffle>-lNN`, objects
runs/<shuffle>/lNN/r<run>-k<block>.parts) while more than MERGE_FAN_IN map objects are left, so a
reduce task reads at most MERGE_FAN_IN objects: bands, candidates, shingles, edges, the
output of each components step (rNNN-large, rNNN-small) for the next, and the removed ids.

  near-signatures  per batch: band hashes of each document exact dedup kept, a partition
                   per band-hash range P              bands/b<batch>.parts
  near-buckets     per range: documents sharing a bucket; with verification, the buckets in
                   verify groups G (whole buckets, as many groups as keep one group's
                   candidates' shingles inside the budget) and the candidates (id, range, group),
                   a partition per batch          buckets/p<P>-g<G>.parquet, candidates/p<P>.parts
                   without: star edges                edges/p<P>.parts
  near-shingles    per batch (verify): the candidates' shingles, hashed to 32 bits (4 bytes a
                   shingle; collisions are ~1e-6 of a 3,000-shingle document), a partition per
                   verify group, in range order       shingles/b<batch>.parts
  near-verify      per span of VERIFY_SPAN_GROUPS consecutive groups (verify): its part of each
                   of the last level's runs (at most MERGE_FAN_IN objects) is spilled to local
                   disk; then group by group, the edges whose true Jaccard reaches the threshold
                                                      edges/v<first group>.parts
  near-components-rNNN-{large,small}
                   per vertex partition: one round of large-star and small-star, until a round
                   changes nothing; edges and stars have a partition per vertex partition Q
                                                      components/rNNN/{large,small}/q<from>.parts
  near-dedup       per vertex partition: every non-center member, removed for the smallest id
                   of its component, a partition per block of plan files
                                                      removed/q<Q>.parts (id, kept_id)
  near-merge       per block of plan files: its removed ids (through merge levels) in one
                   object, a partition per plan file (tasks.removals)
                                                      merged/k<block>.parts
  near-sample      the first removed documents in plan order beside the ones kept: sample.parquet

Each shuffle costs O((M + R) log M) range reads with M map and R reduce tasks, not 2 x M x R:
bands (B batches to P ranges), candidates (P to B), shingles (B to G / VERIFY_SPAN_GROUPS verify
spans), edges and components (to and from Q vertex partitions), removed ids (Q to blocks of
plan files); each level rewrites the shuffle's bytes once. Verifying
from the 128-value MinHash signatures instead (no shingles shuffle at all) was measured and
rejected: on benchmarks/dedup.py's code corpus (5,000 documents, 16 x 8 bands) estimated Jaccard
gave precision 0.90 / recall 0.91 against exact all-pairs truth, exact shingles 1.00 / 0.996;
lowering the estimate's threshold to 0.76 restores recall (0.996) at precision 0.76.

All keys are under `dedup/near/` (storage.build_layout). The near-dedup receipts carry each
source's near_dup count as typed accounting.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from storage import build_layout as layout
from storage.build_layout import batch_name, partition_name, verify_group_name, verify_span_name, vertex_partition_name
from storage.manifest import ObjectInfo, ShardResult, SourceAccounting
from storage.stage_summary import StageSummary
from storage.store import Store
from tasks.config import TASK_MEMORY_BYTES, MinHashConfig
from tasks import removals
from tasks.near_dedup import components, lsh
from tasks.parquet_io import read_table, write_partitions, write_table
from tasks.partitioning import VERIFY_SPAN_GROUPS, batches, partitions, rows_by_partition, verify_member_bytes
from tasks.plan import PlannedFile, SourceRanges, ordinal_of
from tasks.shuffle import MergedShuffle, merged_shuffle, spill_span, spilled_tables
from tasks.stage import NEAR_DEDUP, Run, Stage
from tasks.stage_counts import (
    BucketCounts,
    CandidateCounts,
    NearDupCounts,
    SampleCounts,
    SignatureCounts,
    StarCounts,
    VerifyCounts,
)

STAGE = NEAR_DEDUP  # the step whose receipts carry the per-source near_dup counts
SAMPLE_ROWS = 100
SNIPPET_CHARS = 300
SIGN_BATCH = 4096  # documents turned into Python strings at a time
MAX_ROUNDS = 64  # large-star/small-star needs O(log^2 n): far fewer in practice

BANDS_SCHEMA = pa.schema([("hash", pa.uint64()), ("id", pa.int64())])
BUCKETS_SCHEMA = pa.schema([("bucket", pa.int64()), ("id", pa.int64())])
CANDIDATES_SCHEMA = pa.schema([("id", pa.int64()), ("range", pa.int32()), ("group", pa.int32())])  # group: its index in the range
SHINGLES_SCHEMA = pa.schema([("id", pa.int64()), ("shingles", pa.list_(pa.uint32()))])
EDGES_SCHEMA = pa.schema([("vertex", pa.int64()), ("neighbor", pa.int64())])
SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("source", pa.string()),
        ("kept_id", pa.int64()),
        ("kept_source", pa.string()),
        ("jaccard", pa.float64()),
        ("text", pa.string()),
        ("kept_text", pa.string()),
    ]
)


@dataclass(frozen=True)
class DocsShard:
    """One docs shard as near dedup sees it."""

    file: PlannedFile  # its ids are document_id(file.ordinal, record)
    key: str  # the docs parquet (columns id, text, ...), relative to the build store
    exclude: bool = False  # skip the documents exact dedup removed
    size: int = 0  # bytes of the docs parquet, for batching

    @property
    def shard(self) -> str:
        return self.file.shard


@dataclass(frozen=True)
class DocsBatch:
    """Consecutive docs shards handled by one map task."""

    index: int
    shards: tuple[DocsShard, ...]

    @property
    def name(self) -> str:
        return batch_name(self.index)


def docs_batches(shards: Sequence[DocsShard], batch_bytes: int) -> list[DocsBatch]:
    """Consecutive shards in plan order, about `batch_bytes` of docs each; depends only on the
    shards, never on the workers."""
    ranges = batches([s.size for s in shards], batch_bytes)
    return [DocsBatch(i, tuple(shards[r.start : r.stop])) for i, r in enumerate(ranges)]


# -- helpers ------------------------------------------------------------------------------


def hasher(cfg: MinHashConfig):
    """The config's MinHasher (tasks.near_dedup.minhash)."""
    from tasks.near_dedup import minhash  # numba and its kernels (~170 MiB) load in the workers, not the driver

    return minhash.MinHasher(cfg.ngram, cfg.shingle == "word", cfg.num_perm, cfg.seed)


def bands_rows(cfg: MinHashConfig) -> tuple[int, int]:
    if cfg.bands is not None and cfg.rows is not None:
        return cfg.bands, cfg.rows
    return lsh.optimal_bands_rows(cfg.threshold, cfg.num_perm)


def _union(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The distinct ids of some id arrays, sorted."""
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def _pairs(store: Store, shuffle: MergedShuffle, partition: int) -> tuple[np.ndarray, np.ndarray]:
    """A vertex partition's (vertex, neighbor) pairs from every object of an edges shuffle."""
    table = shuffle.read(store, partition)
    return table.column(0).to_numpy(), table.column(1).to_numpy()


def _both_directions(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([first, second]), np.concatenate([second, first])


def _write_pairs(store: Store, key: str, partitions: int, first: np.ndarray, second: np.ndarray) -> list[ObjectInfo]:
    """Write (first, second) pairs, sorted and distinct, into one object with a partition per
    vertex partition of `first`."""
    first, second = components.unique_pairs(first, second)
    partition = components.partition_of(first, partitions)
    tables = [pa.table([first[rows], second[rows]], schema=EDGES_SCHEMA) for rows in rows_by_partition(partition, partitions)]
    return [write_partitions(store, key, tables)]


def _shard_of_ordinal(shards: Sequence[DocsShard]) -> dict[int, DocsShard]:
    return {s.file.ordinal: s for s in shards}


def _by_ordinal(ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Sorted ids split by the docs shard (plan ordinal) they belong to."""
    ordinals = ordinal_of(ids)
    values, starts = np.unique(ordinals, return_index=True)
    return list(zip(values.tolist(), np.split(ids, starts[1:])))


def _read_docs(store: Store, shard: DocsShard, wanted: np.ndarray | None = None) -> tuple[np.ndarray, pa.Array]:
    """(ids, texts) of a docs shard, or of its rows whose id is in `wanted`."""
    table = read_table(store, shard.key, columns=["id", "text"])
    ids = table.column("id").to_numpy()
    foreign = ordinal_of(ids) != shard.file.ordinal
    if np.any(foreign):
        bad = ids[foreign][0]
        raise ValueError(
            f"{store.url(shard.key)}: document id {bad} does not belong to plan file {shard.file.ordinal} "
            f"({shard.file.uri})"
        )
    texts = table.column("text").combine_chunks()
    if wanted is not None:
        rows = np.flatnonzero(np.isin(ids, wanted))
        ids, texts = ids[rows], texts.take(pa.array(rows))
    return ids, texts


# -- steps --------------------------------------------------------------------------------


def batch_starts(batches: Sequence[DocsBatch]) -> np.ndarray:
    """The first plan ordinal of each batch: all a task needs to know the batches (they are runs
    of consecutive docs shards), one int64 each, passed zero-copy, never the shards."""
    return np.array([b.shards[0].file.ordinal for b in batches], dtype=np.int64)


def _batch_index(ids: np.ndarray, first_ordinals: np.ndarray) -> np.ndarray:
    """The index of the batch of docs shards each id belongs to."""
    return np.searchsorted(first_ordinals, ordinal_of(ids), side="right") - 1


def compute_signatures(store: Store, cfg: MinHashConfig, batch: DocsBatch) -> ShardResult:
    """Band hashes of every document of a batch of docs shards that is not excluded, a
    partition per hash range in one object for the whole batch."""
    bands, rows = bands_rows(cfg)
    minhash = hasher(cfg)
    hashes, owners, documents, shingles = [], [], 0, 0
    for shard in batch.shards:
        ids, texts = _read_docs(store, shard)
        excluded = removals.removed_pairs(store, layout.exact_merged, shard.file)[0] if shard.exclude else np.empty(0, np.int64)
        keep = np.flatnonzero(~np.isin(ids, excluded))
        documents += len(ids)
        band_hashes = np.empty((len(keep), bands), dtype=np.uint64)
        for start in range(0, len(keep), SIGN_BATCH):
            chunk = keep[start : start + SIGN_BATCH]
            signatures, sizes = minhash.signatures_and_sizes(texts.take(pa.array(chunk)).to_pylist())
            band_hashes[start : start + len(chunk)] = minhash.band_hashes(signatures, bands, rows)
            shingles += int(sizes.sum())
        hashes.append(band_hashes.reshape(-1))
        owners.append(np.repeat(ids[keep], bands))
    hashes, owners = np.concatenate(hashes), np.concatenate(owners)
    partitions = cfg.bucket_partitions
    partition = (((hashes >> np.uint64(32)) * np.uint64(partitions)) >> np.uint64(32)).astype(np.int64)
    tables = [pa.table([hashes[rows], owners[rows]], schema=BANDS_SCHEMA) for rows in rows_by_partition(partition, partitions)]
    outputs = [write_partitions(store, layout.near_bands(batch.index), tables)]
    signed = len(owners) // bands
    counts = SignatureCounts(documents=documents, excluded=documents - signed, signed=signed, shingles=shingles)
    return ShardResult(outputs=outputs, counts=counts)


def find_buckets(
    store: Store, bands: MergedShuffle, first_ordinals: np.ndarray, cfg: MinHashConfig, member_bytes: int, budget: int,
    partition: int,
) -> ShardResult:
    """Documents that share a band bucket within one hash range; with verification, the
    buckets split into groups of whole buckets that each hold at most `budget` when verified
    (`member_bytes` per bucket membership). `first_ordinals`: batch_starts of the docs batches."""
    table = bands.read(store, partition)
    members, starts = lsh.group_buckets(table.column("hash").to_numpy(), table.column("id").to_numpy())
    members, starts = lsh.distinct_buckets(members, starts)
    if not cfg.verify:
        first, second = lsh.star_edges(members, starts)
        outputs = _write_edges(store, cfg, partition_name(partition), first, second)
        return ShardResult(outputs=outputs, counts=BucketCounts(buckets=len(starts), members=len(members), edges=len(first)))
    sizes = lsh.bucket_sizes(starts, len(members))
    groups = partitions(len(members), member_bytes, budget)
    # consecutive buckets (in band-hash order, so unrelated) with about equal memberships
    group_of_bucket = (np.cumsum(sizes) - sizes) * groups // max(len(members), 1)
    group_of_member = np.repeat(group_of_bucket, sizes)
    bucket = np.repeat(np.arange(len(starts), dtype=np.int64), sizes)
    outputs, candidates, candidate_groups = [], [], []
    for g, rows in enumerate(rows_by_partition(group_of_member, groups)):
        table = pa.table([bucket[rows], members[rows]], schema=BUCKETS_SCHEMA)
        outputs.append(write_table(store, layout.near_buckets(verify_group_name(partition, g)), table))
        candidates.append(np.unique(members[rows]))
        candidate_groups.append(np.full(len(candidates[-1]), g, dtype=np.int32))
    ids, group_of_id = np.concatenate(candidates), np.concatenate(candidate_groups)
    order = np.lexsort((group_of_id, ids))
    ids, group_of_id = ids[order], group_of_id[order]
    tables = [
        pa.table([ids[rows], np.full(len(rows), partition, dtype=np.int32), group_of_id[rows]], schema=CANDIDATES_SCHEMA)
        for rows in rows_by_partition(_batch_index(ids, first_ordinals), len(first_ordinals))
    ]
    outputs.append(write_partitions(store, layout.near_candidates(partition), tables))
    return ShardResult(outputs=outputs, counts=BucketCounts(buckets=len(starts), members=len(members), verify_groups=groups))


def _write_edges(store: Store, cfg: MinHashConfig, source: str, first: np.ndarray, second: np.ndarray) -> list[ObjectInfo]:
    """Edges in both directions, a partition per vertex partition of their first endpoint."""
    return _write_pairs(store, layout.near_edges(source), cfg.component_partitions, *_both_directions(first, second))


def compact_shingles(sets: list[np.ndarray]) -> list[np.ndarray]:
    """Shingle sets with each 64-bit hash cut to its top 32 bits: half the bytes to ship,
    and Jaccard unchanged but for a collision in ~4e9 shingle pairs."""
    return [np.unique((s >> np.uint64(32)).astype(np.uint32)) for s in sets]


def _candidate_shingles(cfg: MinHashConfig, texts: pa.Array) -> list[np.ndarray]:
    """Compact shingle sets of some texts, SIGN_BATCH at a time: the 64-bit sets of a whole
    docs shard would be 8 bytes per character at once."""
    minhash, sets = hasher(cfg), []
    for start in range(0, len(texts), SIGN_BATCH):
        sets.extend(compact_shingles(minhash.shingle_sets(texts.slice(start, SIGN_BATCH).to_pylist())))
    return sets


def _list_array(sets: list[np.ndarray]) -> pa.ListArray:
    offsets = np.cumsum([0] + [len(s) for s in sets]).astype(np.int32)
    values = np.concatenate(sets) if sets else np.empty(0, np.uint32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.uint32()))


def _take_ascending(chunks: Sequence[pa.Array], rows: np.ndarray) -> pa.ChunkedArray:
    """Rows (ascending) of arrays laid end to end, taken chunk by chunk: a take over a chunked
    array concatenates every chunk first, a copy of them all per call."""
    starts = np.cumsum([0] + [len(c) for c in chunks])
    cuts = np.searchsorted(rows, starts)
    taken = [chunk.take(pa.array(rows[a:b] - start)) for chunk, start, a, b in zip(chunks, starts, cuts[:-1], cuts[1:])]
    return pa.chunked_array(taken, SHINGLES_SCHEMA.field("shingles").type)


def collect_shingles(store: Store, cfg: MinHashConfig, candidates: MergedShuffle, groups: VerifyGroups, batch: DocsBatch) -> ShardResult:
    """Hashed shingles of a batch's candidate documents, a partition per verify group (in the
    order of their numbers) in one object."""
    table = candidates.read(store, batch.index)
    candidate_ids = table.column("id").to_numpy()
    number = groups.first[table.column("range").to_numpy()] + table.column("group").to_numpy()
    # ids ascend within a group: a group is one range's, whose rows come in id order
    wanted_by_group = [candidate_ids[rows] for rows in rows_by_partition(number, len(groups))]
    wanted = _union(wanted_by_group)
    # one list array per docs shard, so the batch's shingles are held once, never copied whole
    found_ids, found_sets = [], []
    by_ordinal = {s.file.ordinal: s for s in batch.shards}
    for ordinal, shard_wanted in _by_ordinal(wanted):
        shard = by_ordinal[ordinal]
        shard_ids, texts = _read_docs(store, shard, shard_wanted)
        if len(shard_ids) != len(shard_wanted):
            missing = np.setdiff1d(shard_wanted, shard_ids)[0]
            raise ValueError(f"{store.url(shard.key)}: candidate document {missing} is not in the docs shard")
        order = np.argsort(shard_ids)
        found_ids.append(shard_ids[order])
        found_sets.append(_list_array(_candidate_shingles(cfg, texts.take(pa.array(order)))))
    ids = np.concatenate(found_ids) if found_ids else np.empty(0, np.int64)
    id_array = pa.array(ids)

    def group_tables():  # one group's copy of its candidates' shingles at a time
        for group in range(len(groups)):
            rows = np.searchsorted(ids, wanted_by_group[group])
            yield pa.table([id_array.take(pa.array(rows)), _take_ascending(found_sets, rows)], schema=SHINGLES_SCHEMA)

    outputs = [write_partitions(store, layout.near_shingles(batch.index), group_tables(), len(groups))]
    return ShardResult(outputs=outputs, counts=CandidateCounts(candidates=len(wanted)))


def verify_spans(groups: int) -> list[range]:
    """Consecutive verify groups, VERIFY_SPAN_GROUPS a task."""
    return [range(first, min(first + VERIFY_SPAN_GROUPS, groups)) for first in range(0, groups, VERIFY_SPAN_GROUPS)]


def _shingle_table(tables: Iterable[pa.Table], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A verify group's candidates from every batch, in batch order: (sorted ids, shingle values,
    each id's offsets into them); the shingles are held at most twice."""
    ids, values, offsets, base = [], [], [], 0
    for table in tables:  # batch order: ids ascend
        if table.num_rows == 0:
            continue
        table = table.combine_chunks()
        ids.append(table.column("id").to_numpy())
        column = table.column("shingles").chunk(0)
        values.append(column.values.to_numpy())
        offsets.append(column.offsets.to_numpy()[:-1].astype(np.int64) + base)
        base += len(values[-1])
    if not ids:
        return np.empty(0, np.int64), np.empty(0, np.uint32), np.zeros(1, np.int64)
    ids = np.concatenate(ids)
    if np.any(ids[1:] <= ids[:-1]):
        raise ValueError(f"{where}: the candidate ids do not ascend across batches")
    return ids, np.concatenate(values), np.append(np.concatenate(offsets), base)


def _verify_group(
    store: Store, cfg: MinHashConfig, group: str, ids: np.ndarray, values: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges between members of one verify group's buckets whose true Jaccard reaches the threshold."""
    buckets = read_table(store, layout.near_buckets(group))
    members = buckets.column("id").to_numpy()
    starts, _ = components.runs(buckets.column("bucket").to_numpy())
    del buckets

    def similarity(a: int, b: int) -> float:
        ra, rb = np.searchsorted(ids, (a, b))
        return lsh.jaccard(values[offsets[ra] : offsets[ra + 1]], values[offsets[rb] : offsets[rb + 1]])

    return lsh.verified_edges(members, starts, similarity, cfg.threshold, cfg.verify_anchors)


def verify_span(store: Store, cfg: MinHashConfig, shingles: MergedShuffle, groups: VerifyGroups, span: range) -> ShardResult:
    """The edges of a span of verify groups: its part of each run of the shingles' last merge
    level (at most MERGE_FAN_IN objects, together every batch's) is read once into a local
    file, then each group is verified in turn, so memory holds one group's candidates."""
    keys, first = shingles.sources(span.start)
    first_edges, second_edges, comparisons = [], [], 0
    with tempfile.TemporaryFile() as spill:
        where = spill_span(store, keys, range(first, first + len(span)), spill)
        for offset, group in enumerate(span):
            names = [f"{store.url(key)}: partition {first + offset}" for key in keys]
            name = groups.name(group)
            found = _shingle_table(spilled_tables(spill, where, offset, names, SHINGLES_SCHEMA), f"verify group {name} in {keys[0]}")
            edges = _verify_group(store, cfg, name, *found)
            first_edges.append(edges[0])
            second_edges.append(edges[1])
            comparisons += edges[2]
    first_ids, second_ids = np.concatenate(first_edges), np.concatenate(second_edges)
    outputs = _write_edges(store, cfg, _span_name(span), first_ids, second_ids)
    return ShardResult(outputs=outputs, counts=VerifyCounts(groups=len(span), comparisons=comparisons, edges=len(first_ids)))


def _edges_key(span_groups: int, source: int) -> str:
    """The edges one verify span found (spans of `span_groups` groups), or without verification
    (`span_groups` 0) one bucket range: a number, so no task is given a name per span."""
    return layout.near_edges(verify_span_name(source * span_groups) if span_groups else partition_name(source))


def large_star_step(store: Store, round_: int, pairs: MergedShuffle, partition: int) -> ShardResult:
    """One round's large-star over its vertex partition of `pairs`: in round 0 the edges every
    bucket range or verify span found, then the previous round's small-star."""
    vertex, neighbor = _pairs(store, pairs, partition)
    larger, smaller, changed = components.large_star(vertex, neighbor)
    outputs = _write_pairs(store, layout.near_star(round_, "large", partition), pairs.partitions, larger, smaller)
    return ShardResult(outputs=outputs, counts=StarCounts(edges_in=len(vertex), changed=changed))


def small_star_step(store: Store, round_: int, pairs: MergedShuffle, partition: int) -> ShardResult:
    larger, smaller = _pairs(store, pairs, partition)
    new_larger, new_smaller, changed = components.small_star(larger, smaller)
    key = layout.near_star(round_, "small", partition)
    outputs = _write_pairs(store, key, pairs.partitions, *_both_directions(new_larger, new_smaller))
    return ShardResult(outputs=outputs, counts=StarCounts(edges_in=len(larger), changed=changed))


def write_removed(store: Store, sources: SourceRanges, stars: MergedShuffle, removed_ids: MergedShuffle, partition: int) -> ShardResult:
    """From the converged stars (the last small-star): each non-center vertex is removed for its
    center, the smallest id of its component; written a partition per block of plan files."""
    vertex, neighbor = _pairs(store, stars, partition)
    leaf = vertex > neighbor
    removed, kept = vertex[leaf], neighbor[leaf]
    outputs = [removals.write_removed(store, removed_ids, partition, removed, kept)]
    accounting = {source: SourceAccounting(near_dup=n) for source, n in sources.count(removed).items()}
    return ShardResult(outputs=outputs, counts=NearDupCounts(near_dup=len(removed)), sources=accounting)


def write_sample(store: Store, shards: Sequence[DocsShard], cfg: MinHashConfig, rows: int = SAMPLE_ROWS) -> ShardResult:
    """The first `rows` removed documents in plan order, beside the document kept for each."""
    by_ordinal = _shard_of_ordinal(shards)
    removed, kept = [], []
    for shard in sorted(shards, key=lambda s: s.file.ordinal):
        ids, kept_ids = removals.removed_pairs(store, layout.near_merged, shard.file)
        removed.append(ids[: rows - sum(map(len, removed))])
        kept.append(kept_ids[: len(removed[-1])])
        if sum(map(len, removed)) >= rows:
            break
    removed_ids = np.concatenate(removed) if removed else np.empty(0, np.int64)
    kept_ids = np.concatenate(kept) if kept else np.empty(0, np.int64)
    texts: dict[int, str] = {}
    for ordinal, ids in _by_ordinal(np.unique(np.concatenate([removed_ids, kept_ids]))):
        found, found_texts = _read_docs(store, by_ordinal[ordinal], ids)
        texts.update(zip(found.tolist(), found_texts.to_pylist()))
    removed_texts = [texts[i] for i in removed_ids.tolist()]
    kept_texts = [texts[i] for i in kept_ids.tolist()]
    sets = hasher(cfg).shingle_sets(removed_texts + kept_texts)
    similarity = [lsh.jaccard(a, b) for a, b in zip(sets[: len(removed_texts)], sets[len(removed_texts) :])]
    source = [by_ordinal[int(o)].file.source for o in ordinal_of(removed_ids)]
    kept_source = [by_ordinal[int(o)].file.source for o in ordinal_of(kept_ids)]
    table = pa.table(
        [
            removed_ids, source, kept_ids, kept_source, similarity,
            [t[:SNIPPET_CHARS] for t in removed_texts], [t[:SNIPPET_CHARS] for t in kept_texts],
        ],
        schema=SAMPLE_SCHEMA,
    )
    outputs = [write_table(store, layout.NEAR_SAMPLE, table)]
    return ShardResult(outputs=outputs, counts=SampleCounts(rows=len(removed_ids)))


# -- the stage ----------------------------------------------------------------------------


def _batch_name(batch: DocsBatch) -> str:
    return batch.name


def _sample_name(_rows: int) -> str:
    return "sample"


def _span_name(span: range) -> str:
    return verify_span_name(span.start)


@dataclass(frozen=True)
class VerifyGroups:
    """Every verify group the bucket ranges split into, numbered in range order: one int per
    range for a task to hold (passed zero-copy), never a name per group."""

    first: np.ndarray  # the number of each range's first group, then the number of groups

    @classmethod
    def of(cls, buckets: StageSummary) -> VerifyGroups:
        groups = dict(zip(buckets.shards, (c.verify_groups for c in buckets.per_shard(BucketCounts))))
        counts = [groups[partition_name(p)] for p in range(len(groups))]
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def __len__(self) -> int:
        return int(self.first[-1])

    def name(self, number: int) -> str:
        partition = int(np.searchsorted(self.first, number, side="right")) - 1
        return verify_group_name(partition, number - int(self.first[partition]))


def _shuffle(name: str, map_key: Callable[[int], str], schema: pa.Schema, maps: int, partitions: int, span: int = 1) -> MergedShuffle:
    """A near-dedup shuffle through merge levels: steps `near-runs-<name>-lNN`, objects under runs/<name>/."""
    return merged_shuffle(f"near-runs-{name}", partial(layout.near_runs, name), map_key, schema, maps, partitions, span)


def run_near_dedup(
    store: Store, shards: Sequence[DocsShard], cfg: MinHashConfig, run: Run, batch_bytes: int,
    budget: int = TASK_MEMORY_BYTES,
) -> dict[str, int]:
    """Run every step over the docs shards; returns near_dup counts per source. `cfg` has its
    partition counts resolved (tasks.partitioning); verify groups are sized to `budget` from
    the shingles the signatures step counted."""
    shards = list(shards)
    batches = docs_batches(shards, batch_bytes)
    partitions = list(range(cfg.bucket_partitions))
    vertex_partitions = list(range(cfg.component_partitions))
    signed = run(Stage("near-signatures", batches, _batch_name, partial(compute_signatures, store, cfg), (layout.NEAR_BANDS,)))
    signatures = signed.totals(SignatureCounts)
    member_bytes = verify_member_bytes(signatures.shingles / max(signatures.signed, 1))
    bands = _shuffle("bands", layout.near_bands, BANDS_SCHEMA, len(batches), len(partitions))
    for stage in bands.stages(store):
        run(stage)
    bucket_outputs = (layout.NEAR_BUCKETS, layout.NEAR_CANDIDATES) if cfg.verify else (layout.NEAR_EDGES,)
    buckets = run(
        Stage(
            "near-buckets", partitions, partition_name,
            partial(find_buckets, store, bands, batch_starts(batches), cfg, member_bytes, budget),
            bucket_outputs,
        )
    )
    verify_groups = 0
    if cfg.verify:
        groups = VerifyGroups.of(buckets)
        candidates = _shuffle("candidates", layout.near_candidates, CANDIDATES_SCHEMA, len(partitions), len(batches))
        for stage in candidates.stages(store):
            run(stage)
        run(Stage("near-shingles", batches, _batch_name, partial(collect_shingles, store, cfg, candidates, groups), (layout.NEAR_SHINGLES,)))
        shingles = _shuffle("shingles", layout.near_shingles, SHINGLES_SCHEMA, len(batches), len(groups), VERIFY_SPAN_GROUPS)
        for stage in shingles.stages(store):
            run(stage)
        verify = partial(verify_span, store, cfg, shingles, groups)
        run(Stage("near-verify", verify_spans(len(groups)), _span_name, verify, (layout.NEAR_EDGES,)))
        verify_groups = len(groups)
    # every components step reads the step before it through merge levels, round 0 the edges
    span_groups, sources = (VERIFY_SPAN_GROUPS, len(verify_spans(verify_groups))) if cfg.verify else (0, len(partitions))
    pairs = _shuffle("edges", partial(_edges_key, span_groups), EDGES_SCHEMA, sources, len(vertex_partitions))
    for round_ in range(MAX_ROUNDS):
        changed = 0
        for step, work in (("large", large_star_step), ("small", small_star_step)):
            for stage in pairs.stages(store):
                run(stage)
            summary = run(
                Stage(
                    f"near-components-r{round_:03d}-{step}", vertex_partitions, vertex_partition_name,
                    partial(work, store, round_, pairs), (layout.near_components(round_, step),),
                )
            )
            changed += summary.totals(StarCounts).changed
            name = f"r{round_:03d}-{step}"
            pairs = _shuffle(name, partial(layout.near_star, round_, step), EDGES_SCHEMA, len(vertex_partitions), len(vertex_partitions))
        if changed == 0:
            break
    else:
        raise RuntimeError(f"near dedup: connected components did not converge in {MAX_ROUNDS} rounds")
    for stage in pairs.stages(store):
        run(stage)
    removed_ids = removals.near_removed_ids(len(vertex_partitions), 1 + max((s.file.ordinal for s in shards), default=-1))
    removed = run(
        Stage(
            STAGE, vertex_partitions, vertex_partition_name,
            partial(write_removed, store, SourceRanges.of([s.file for s in shards]), pairs, removed_ids),
            (layout.NEAR_REMOVED,),
        )
    )
    for stage in removed_ids.stages(store):
        run(stage)
    run(removals.merge_stage("near-merge", store, removed_ids, layout.near_merged, layout.NEAR_MERGED))
    run(Stage("near-sample", [SAMPLE_ROWS], _sample_name, partial(write_sample, store, shards, cfg), (layout.NEAR_SAMPLE,)))
    per_source = {s.file.source: 0 for s in shards}
    per_source.update({name: acc.near_dup for name, acc in removed.sources().items()})
    return per_source
