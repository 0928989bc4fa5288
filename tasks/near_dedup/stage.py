"""Stage 4: near-duplicate removal, MinHash LSH over docs shards, as small fan-out steps.

Every step is a list of independent tasks (one per docs shard or per partition) that read
and write parquet on the build store and return a Receipt; `fan_out` runs them (on Ray, with
receipts, so a rerun redoes only unfinished tasks). No task holds all documents, all edges
or all ids: P = `bucket_partitions` and Q = `component_partitions` bound what one task sees.

  near-signatures  per docs shard: band hashes of each document that exact dedup kept, split
                   into P band-hash ranges            bands/p<P>/<shard>.parquet
  near-buckets     per range: documents sharing a bucket; with verification, the buckets and
                   each shard's candidates            buckets/p<P>.parquet, candidates/<shard>/p<P>.parquet
                   without: star edges                edges/q<Q>/p<P>.parquet
  near-shingles    per docs shard (verify): shingle sets of its candidates, sent to each range
                   that needs them                    shingles/p<P>/<shard>.parquet
  near-verify      per range (verify): edges whose true Jaccard reaches the threshold
  near-components-rNNN-{large,small}
                   per vertex partition: one round of large-star and small-star, until a round
                   changes nothing                    components/rNNN/{large,small}/q<to>/q<from>.parquet
  near-dedup       per vertex partition: every non-center member, removed for the smallest id
                   of its component                   removed/<shard>/q<Q>.parquet (id, kept_id)
  near-sample      the first removed documents in plan order beside the ones kept: sample.parquet

All keys are under `dedup/near/`. The near-dedup receipts count `near_dup:<source>`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from storage.manifest import ObjectInfo, Receipt
from storage.store import Store, join_key
from tasks.config import MinHashConfig
from tasks.fanout import Item
from tasks.near_dedup import components, lsh
from tasks.near_dedup.minhash import MinHasher, jaccard
from tasks.parquet_io import read_table, write_table
from tasks.plan import PlannedFile, ordinal_of

FanOut = Callable[[str, Sequence[Item], Callable[[Item], str], Callable[[Item], Receipt]], list[Receipt]]
"""fan_out(stage, items, shard_of, work) -> receipts in item order, like tasks.fanout.run_shards
with the store bound: runs work(item) for every item without a receipt, commits the receipts."""

PREFIX = "dedup/near"
STAGE = "near-dedup"  # the step whose receipts carry the per-source near_dup counts
SAMPLE_KEY = join_key(PREFIX, "sample.parquet")
SAMPLE_ROWS = 100
SNIPPET_CHARS = 300
SIGN_BATCH = 4096  # documents turned into Python strings at a time
MAX_ROUNDS = 64  # large-star/small-star needs O(log^2 n): far fewer in practice

BANDS_SCHEMA = pa.schema([("hash", pa.uint64()), ("id", pa.int64())])
BUCKETS_SCHEMA = pa.schema([("bucket", pa.int64()), ("id", pa.int64())])
IDS_SCHEMA = pa.schema([("id", pa.int64())])
SHINGLES_SCHEMA = pa.schema([("id", pa.int64()), ("shingles", pa.list_(pa.uint64()))])
EDGES_SCHEMA = pa.schema([("vertex", pa.int64()), ("neighbor", pa.int64())])
REMOVED_SCHEMA = pa.schema([("id", pa.int64()), ("kept_id", pa.int64())])
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
    exclude_keys: tuple[str, ...] = ()  # parquet files with an `id` column: documents to skip

    @property
    def shard(self) -> str:
        return self.file.shard


# -- keys ---------------------------------------------------------------------------------


def partition_name(partition: int) -> str:
    return f"p{partition:04d}"


def vertex_partition_name(partition: int) -> str:
    return f"q{partition:04d}"


def bands_key(partition: int, shard: str) -> str:
    return join_key(PREFIX, "bands", partition_name(partition), f"{shard}.parquet")


def buckets_key(partition: int) -> str:
    return join_key(PREFIX, "buckets", f"{partition_name(partition)}.parquet")


def candidates_prefix(shard: str) -> str:
    return join_key(PREFIX, "candidates", shard) + "/"


def shingles_prefix(partition_folder: str) -> str:
    return join_key(PREFIX, "shingles", partition_folder) + "/"


def edges_key(vertex_partition: int, partition: int) -> str:
    return join_key(PREFIX, "edges", vertex_partition_name(vertex_partition), f"{partition_name(partition)}.parquet")


def star_key(round_: int, step: str, to_partition: int, from_partition: int) -> str:
    return join_key(
        PREFIX, "components", f"r{round_:03d}", step, vertex_partition_name(to_partition),
        f"{vertex_partition_name(from_partition)}.parquet",
    )


def removed_prefix(shard: str) -> str:
    return join_key(PREFIX, "removed", shard) + "/"


# -- helpers ------------------------------------------------------------------------------


def hasher(cfg: MinHashConfig) -> MinHasher:
    return MinHasher(cfg.ngram, cfg.shingle == "word", cfg.num_perm, cfg.seed)


def bands_rows(cfg: MinHashConfig) -> tuple[int, int]:
    if cfg.bands is not None and cfg.rows is not None:
        return cfg.bands, cfg.rows
    return lsh.optimal_bands_rows(cfg.threshold, cfg.num_perm)


def _union(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The distinct ids of some id arrays, sorted."""
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)


def _ids(store: Store, keys: Sequence[str]) -> np.ndarray:
    """The union of the `id` columns of some parquet files, sorted."""
    return _union([read_table(store, key, columns=["id"]).column("id").to_numpy() for key in keys])


def _read_all(store: Store, keys: Sequence[str], schema: pa.Schema) -> pa.Table:
    """Some parquet files of one schema as one table (empty when there are none)."""
    tables = [read_table(store, key) for key in keys]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _pairs(store: Store, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    table = _read_all(store, keys, EDGES_SCHEMA)
    return table.column(0).to_numpy(), table.column(1).to_numpy()


def _both_directions(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([first, second]), np.concatenate([second, first])


def _write_pairs(store: Store, keys: Sequence[str], first: np.ndarray, second: np.ndarray) -> list[ObjectInfo]:
    """Write (first, second) pairs into one file per partition of `first`, sorted and
    distinct; every partition gets a file, so readers never list."""
    first, second = components.unique_pairs(first, second)
    partition = components.partition_of(first, len(keys))
    outputs = []
    for index, key in enumerate(keys):
        rows = partition == index
        table = pa.table([first[rows], second[rows]], schema=EDGES_SCHEMA)
        outputs.append(write_table(store, key, table))
    return outputs


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


def compute_signatures(store: Store, cfg: MinHashConfig, shard: DocsShard) -> Receipt:
    """Band hashes of every document of a docs shard that is not excluded, by hash range."""
    bands, rows = bands_rows(cfg)
    minhash = hasher(cfg)
    ids, texts = _read_docs(store, shard)
    keep = np.flatnonzero(~np.isin(ids, _ids(store, shard.exclude_keys)))
    band_hashes = np.empty((len(keep), bands), dtype=np.uint64)
    for start in range(0, len(keep), SIGN_BATCH):
        chunk = keep[start : start + SIGN_BATCH]
        signatures = minhash.signatures(texts.take(pa.array(chunk)).to_pylist())
        band_hashes[start : start + len(chunk)] = minhash.band_hashes(signatures, bands, rows)
    hashes = band_hashes.reshape(-1)
    owners = np.repeat(ids[keep], bands)
    partitions = cfg.bucket_partitions
    partition = (((hashes >> np.uint64(32)) * np.uint64(partitions)) >> np.uint64(32)).astype(np.int64)
    outputs = []
    for p in range(partitions):
        selected = partition == p
        table = pa.table([hashes[selected], owners[selected]], schema=BANDS_SCHEMA)
        outputs.append(write_table(store, bands_key(p, shard.shard), table))
    counts = {"documents": len(ids), "excluded": len(ids) - len(keep), "signed": len(keep)}
    return Receipt(stage="near-signatures", shard=shard.shard, outputs=outputs, counts=counts)


def find_buckets(store: Store, shards: Sequence[DocsShard], cfg: MinHashConfig, partition: int) -> Receipt:
    """Documents that share a band bucket within one hash range."""
    table = _read_all(store, [bands_key(partition, s.shard) for s in shards], BANDS_SCHEMA)
    members, starts = lsh.group_buckets(table.column("hash").to_numpy(), table.column("id").to_numpy())
    members, starts = lsh.distinct_buckets(members, starts)
    counts = {"buckets": len(starts), "members": len(members)}
    if not cfg.verify:
        first, second = lsh.star_edges(members, starts)
        outputs = _write_edges(store, cfg, partition, first, second)
        counts["edges"] = len(first)
        return Receipt(stage="near-buckets", shard=partition_name(partition), outputs=outputs, counts=counts)
    bucket = np.repeat(np.arange(len(starts), dtype=np.int64), lsh.bucket_sizes(starts, len(members)))
    outputs = [write_table(store, buckets_key(partition), pa.table([bucket, members], schema=BUCKETS_SCHEMA))]
    by_ordinal = _shard_of_ordinal(shards)
    for ordinal, ids in _by_ordinal(np.unique(members)):
        key = candidates_prefix(by_ordinal[ordinal].shard) + f"{partition_name(partition)}.parquet"
        outputs.append(write_table(store, key, pa.table([ids], schema=IDS_SCHEMA)))
    return Receipt(stage="near-buckets", shard=partition_name(partition), outputs=outputs, counts=counts)


def _write_edges(store: Store, cfg: MinHashConfig, partition: int, first: np.ndarray, second: np.ndarray) -> list[ObjectInfo]:
    """Edges in both directions, by the vertex partition of their first endpoint."""
    keys = [edges_key(q, partition) for q in range(cfg.component_partitions)]
    return _write_pairs(store, keys, *_both_directions(first, second))


def collect_shingles(store: Store, cfg: MinHashConfig, shard: DocsShard) -> Receipt:
    """Shingle sets of a docs shard's candidate documents, one file per range that needs them."""
    wanted_by_key = {key: _ids(store, [key]) for key in store.list(candidates_prefix(shard.shard))}
    wanted = _union(list(wanted_by_key.values()))
    outputs = []
    if len(wanted):
        ids, texts = _read_docs(store, shard, wanted)
        if len(ids) != len(wanted):
            missing = np.setdiff1d(wanted, ids)[0]
            raise ValueError(f"{store.url(shard.key)}: candidate document {missing} is not in the docs shard")
        order = np.argsort(ids)
        ids, sets = ids[order], hasher(cfg).shingle_sets(texts.take(pa.array(order)).to_pylist())
        offsets = np.cumsum([0] + [len(s) for s in sets]).astype(np.int32)
        all_sets = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(sets), pa.uint64()))
        for key, key_ids in wanted_by_key.items():
            rows = pa.array(np.searchsorted(ids, key_ids))
            folder = key.rsplit("/", 1)[1].removesuffix(".parquet")
            table = pa.table([pa.array(ids).take(rows), all_sets.take(rows)], schema=SHINGLES_SCHEMA)
            outputs.append(write_table(store, shingles_prefix(folder) + f"{shard.shard}.parquet", table))
    counts = {"candidates": len(wanted)}
    return Receipt(stage="near-shingles", shard=shard.shard, outputs=outputs, counts=counts)


def verify_buckets(store: Store, cfg: MinHashConfig, partition: int) -> Receipt:
    """Edges between members of one range's buckets whose true Jaccard reaches the threshold."""
    buckets = read_table(store, buckets_key(partition))
    members = buckets.column("id").to_numpy()
    bucket = buckets.column("bucket").to_numpy()
    starts, _ = components.runs(bucket)
    table = _read_all(store, list(store.list(shingles_prefix(partition_name(partition)))), SHINGLES_SCHEMA)
    shingles = table.column("shingles").combine_chunks()
    values = shingles.values.to_numpy()
    offsets = shingles.offsets.to_numpy()
    row_of = {doc: row for row, doc in enumerate(table.column("id").to_pylist())}

    def similarity(a: int, b: int) -> float:
        ra, rb = row_of[a], row_of[b]
        return jaccard(values[offsets[ra] : offsets[ra + 1]], values[offsets[rb] : offsets[rb + 1]])

    first, second, comparisons = lsh.verified_edges(members, starts, similarity, cfg.threshold, cfg.verify_anchors)
    outputs = _write_edges(store, cfg, partition, first, second)
    counts = {"comparisons": comparisons, "edges": len(first)}
    return Receipt(stage="near-verify", shard=partition_name(partition), outputs=outputs, counts=counts)


def large_star_step(store: Store, cfg: MinHashConfig, round_: int, partition: int) -> Receipt:
    partitions = range(cfg.component_partitions)
    if round_ == 0:
        inputs = [edges_key(partition, p) for p in range(cfg.bucket_partitions)]
    else:
        inputs = [star_key(round_ - 1, "small", partition, q) for q in partitions]
    vertex, neighbor = _pairs(store, inputs)
    larger, smaller, changed = components.large_star(vertex, neighbor)
    keys = [star_key(round_, "large", q, partition) for q in partitions]
    outputs = _write_pairs(store, keys, larger, smaller)
    counts = {"edges_in": len(vertex), "changed": changed}
    return Receipt(stage=f"near-components-r{round_:03d}-large", shard=vertex_partition_name(partition), outputs=outputs, counts=counts)


def small_star_step(store: Store, cfg: MinHashConfig, round_: int, partition: int) -> Receipt:
    partitions = range(cfg.component_partitions)
    larger, smaller = _pairs(store, [star_key(round_, "large", partition, q) for q in partitions])
    new_larger, new_smaller, changed = components.small_star(larger, smaller)
    keys = [star_key(round_, "small", q, partition) for q in partitions]
    outputs = _write_pairs(store, keys, *_both_directions(new_larger, new_smaller))
    counts = {"edges_in": len(larger), "changed": changed}
    return Receipt(stage=f"near-components-r{round_:03d}-small", shard=vertex_partition_name(partition), outputs=outputs, counts=counts)


def write_removed(
    store: Store, shards: Sequence[DocsShard], cfg: MinHashConfig, final_round: int, partition: int
) -> Receipt:
    """From the converged stars: each non-center vertex is removed for its center, the
    smallest id of its component; written per docs shard for the tokenize stage."""
    vertex, neighbor = _pairs(store, [star_key(final_round, "small", partition, q) for q in range(cfg.component_partitions)])
    leaf = vertex > neighbor
    removed, kept = vertex[leaf], neighbor[leaf]
    order = np.argsort(removed)
    removed, kept = removed[order], kept[order]
    by_ordinal = _shard_of_ordinal(shards)
    outputs, per_source = [], Counter()
    for ordinal, ids in _by_ordinal(removed):
        shard = by_ordinal[ordinal]
        rows = np.searchsorted(removed, ids)
        key = removed_prefix(shard.shard) + f"{vertex_partition_name(partition)}.parquet"
        outputs.append(write_table(store, key, pa.table([ids, kept[rows]], schema=REMOVED_SCHEMA)))
        per_source[shard.file.source] += len(ids)
    counts = {f"near_dup:{source}": n for source, n in sorted(per_source.items())}
    counts["near_dup"] = len(removed)
    return Receipt(stage=STAGE, shard=vertex_partition_name(partition), outputs=outputs, counts=counts)


def _removed_pairs(store: Store, shard: str) -> tuple[np.ndarray, np.ndarray]:
    table = _read_all(store, list(store.list(removed_prefix(shard))), REMOVED_SCHEMA)
    ids, kept = table.column("id").to_numpy(), table.column("kept_id").to_numpy()
    order = np.argsort(ids)
    return ids[order], kept[order]


def removed_ids(store: Store, file: PlannedFile) -> np.ndarray:
    """Sorted ids of one docs shard that near dedup removed (empty when it did not run)."""
    return _ids(store, list(store.list(removed_prefix(file.shard))))


def write_sample(store: Store, shards: Sequence[DocsShard], cfg: MinHashConfig, rows: int = SAMPLE_ROWS) -> Receipt:
    """The first `rows` removed documents in plan order, beside the document kept for each."""
    by_ordinal = _shard_of_ordinal(shards)
    removed, kept = [], []
    for shard in sorted(shards, key=lambda s: s.file.ordinal):
        ids, kept_ids = _removed_pairs(store, shard.shard)
        removed.append(ids[: rows - sum(map(len, removed))])
        kept.append(kept_ids[: len(removed[-1])])
        if sum(map(len, removed)) >= rows:
            break
    removed_ids_ = np.concatenate(removed) if removed else np.empty(0, np.int64)
    kept_ids = np.concatenate(kept) if kept else np.empty(0, np.int64)
    texts: dict[int, str] = {}
    for ordinal, ids in _by_ordinal(np.unique(np.concatenate([removed_ids_, kept_ids]))):
        found, found_texts = _read_docs(store, by_ordinal[ordinal], ids)
        texts.update(zip(found.tolist(), found_texts.to_pylist()))
    removed_texts = [texts[i] for i in removed_ids_.tolist()]
    kept_texts = [texts[i] for i in kept_ids.tolist()]
    sets = hasher(cfg).shingle_sets(removed_texts + kept_texts)
    similarity = [jaccard(a, b) for a, b in zip(sets[: len(removed_texts)], sets[len(removed_texts) :])]
    source = [by_ordinal[int(o)].file.source for o in ordinal_of(removed_ids_)]
    kept_source = [by_ordinal[int(o)].file.source for o in ordinal_of(kept_ids)]
    table = pa.table(
        [
            removed_ids_, source, kept_ids, kept_source, similarity,
            [t[:SNIPPET_CHARS] for t in removed_texts], [t[:SNIPPET_CHARS] for t in kept_texts],
        ],
        schema=SAMPLE_SCHEMA,
    )
    return Receipt(stage="near-sample", shard="sample", outputs=[write_table(store, SAMPLE_KEY, table)], counts={"rows": len(removed_ids_)})


# -- the stage ----------------------------------------------------------------------------


def _shard_name(shard: DocsShard) -> str:
    return shard.shard


def run_near_dedup(store: Store, shards: Sequence[DocsShard], cfg: MinHashConfig, fan_out: FanOut) -> dict[str, int]:
    """Run every step over the docs shards; returns near_dup counts per source."""
    partitions = list(range(cfg.bucket_partitions))
    vertex_partitions = list(range(cfg.component_partitions))
    fan_out("near-signatures", shards, _shard_name, partial(compute_signatures, store, cfg))
    fan_out("near-buckets", partitions, partition_name, partial(find_buckets, store, list(shards), cfg))
    if cfg.verify:
        fan_out("near-shingles", shards, _shard_name, partial(collect_shingles, store, cfg))
        fan_out("near-verify", partitions, partition_name, partial(verify_buckets, store, cfg))
    for round_ in range(MAX_ROUNDS):
        large = fan_out(
            f"near-components-r{round_:03d}-large", vertex_partitions, vertex_partition_name,
            partial(large_star_step, store, cfg, round_),
        )
        small = fan_out(
            f"near-components-r{round_:03d}-small", vertex_partitions, vertex_partition_name,
            partial(small_star_step, store, cfg, round_),
        )
        if sum(r.counts["changed"] for r in large + small) == 0:
            break
    else:
        raise RuntimeError(f"near dedup: connected components did not converge in {MAX_ROUNDS} rounds")
    removed = fan_out(
        STAGE, vertex_partitions, vertex_partition_name, partial(write_removed, store, list(shards), cfg, round_)
    )
    fan_out("near-sample", [SAMPLE_ROWS], lambda _: "sample", partial(write_sample, store, list(shards), cfg))
    per_source = Counter({s.file.source: 0 for s in shards})
    for receipt in removed:
        for name, value in receipt.counts.items():
            if name.startswith("near_dup:"):
                per_source[name.removeprefix("near_dup:")] += value
    return dict(per_source)
