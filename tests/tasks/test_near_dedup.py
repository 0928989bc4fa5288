"""Near dedup: shingles, signatures, LSH, connected components and the whole stage.

The corpus plants near-duplicates by editing copies of random documents, and every planted
similarity is measured with plain Python sets of character 13-grams, independently of the
project's hashing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from functools import partial

import numpy as np
import pyarrow as pa
import pytest

from storage import build_layout as layout
from storage.manifest import Receipt, read_record
from storage.store import LocalStore, Store, open_store
from tasks.config import MinHashConfig
from tasks.fanout import run_stage
from tasks.near_dedup import components, lsh, minhash, steps
from tasks.near_dedup.minhash import MinHasher, normalize
from tasks.near_dedup.steps import (
    BANDS_SCHEMA,
    CANDIDATES_SCHEMA,
    EDGES_SCHEMA,
    SHINGLES_SCHEMA,
    STAGE,
    DocsShard,
    bands_rows,
    docs_batches,
    run_near_dedup,
    verify_spans,
)
from tasks.parquet_io import read_partition, read_table, write_table
from tasks.partitioning import verify_member_bytes
from tasks import removals
from tasks.removals import removed_pairs
from tasks.plan import PlannedFile, document_id
from tasks.shuffle import MERGE_FAN_IN, MergedShuffle

# 16 bands x 8 rows: LSH recall 0.994 at J=0.85 (SlimPajama's 9 x 13 gives 0.69 there: its
# S-curve is centered at 0.845); verification then removes the extra candidates.
CONFIG = MinHashConfig(bands=16, rows=8, bucket_partitions=3, component_partitions=2)
ONE_SHARD_BATCHES = 1  # batch_bytes: every docs shard is its own batch
TIGHT_BUDGET = 1 << 17  # splits a corpus's 3 bucket ranges into ~26 verify groups: 2 verify spans
LEVELS = (0.5, 0.7, 0.85, 0.95)


# -- a reference implementation in plain Python -------------------------------------------


def reference_shingles(text: str, n: int, words: bool) -> set[str]:
    s = normalize(text)
    if not words:
        return {s[i : i + n] for i in range(len(s) - n + 1)} if len(s) >= n else {s}
    units = s.split(" ") if s else []
    if len(units) < n:
        return {s}
    return {" ".join(units[i : i + n]) for i in range(len(units) - n + 1)}


def reference_hash(hasher: MinHasher, shingle: str) -> int:
    """The documented shingle hash, computed with Python integers."""
    mask = (1 << 64) - 1
    raw = 0
    for t, char in enumerate(shingle):
        raw = (raw + ord(char) * pow(hasher._base, t, 1 << 64)) & mask
    raw = (raw + len(shingle) * int(hasher._length_key)) & mask
    h = raw ^ int(hasher._shingle_key)
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & mask
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & mask
    return h ^ (h >> 33)


def true_jaccard(a: str, b: str, n: int = 13) -> float:
    sa, sb = reference_shingles(a, n, False), reference_shingles(b, n, False)
    return len(sa & sb) / len(sa | sb)


# -- a corpus with planted near-duplicates ------------------------------------------------


def random_text(rng: random.Random, vocabulary: list[str], words: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "."


def edited(rng: random.Random, vocabulary: list[str], text: str, target: float) -> str:
    """A copy with words replaced: the fewest edits (of a random sequence) that bring its
    Jaccard to `text` down to about `target`, found by bisection."""
    words = text.split(" ")
    edits = [(rng.randrange(len(words)), rng.choice(vocabulary)) for _ in range(len(words))]

    def apply(count: int) -> str:
        copy = list(words)
        for position, word in edits[:count]:
            copy[position] = word
        return " ".join(copy)

    low, high = 0, len(edits)
    while low < high:
        middle = (low + high) // 2
        if true_jaccard(text, apply(middle)) > target + 0.02:
            low = middle + 1
        else:
            high = middle
    return apply(low)


class Corpus:
    """Docs shards of two sources; near-duplicate pairs at each level, clusters of four,
    exact duplicates (excluded by the exact stage), and unrelated documents."""

    def __init__(self, store: Store, shards: int = 4, seed: int = 7):
        rng = random.Random(seed)
        vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(3000)]
        groups: list[list[str]] = []  # each group: texts that should end up together
        for level in LEVELS:
            for _ in range(10):
                original = random_text(rng, vocabulary, 250)
                groups.append([original, edited(rng, vocabulary, original, level)])
        for _ in range(4):
            original = random_text(rng, vocabulary, 250)
            groups.append([original] + [edited(rng, vocabulary, original, 0.9) for _ in range(3)])
        singles = [[random_text(rng, vocabulary, rng.randint(50, 300))] for _ in range(120)]
        exact = [[random_text(rng, vocabulary, 200)] for _ in range(5)]
        placed = [(g, i, text) for g, group in enumerate(groups + singles + exact) for i, text in enumerate(group)]
        exact_copies = [(len(groups) + len(singles) + e, 1, exact[e][0]) for e in range(len(exact))]
        placed += exact_copies
        rng.shuffle(placed)
        self.files = [PlannedFile(source="web" if k % 2 == 0 else "code", uri=f"mem://{k}", size=0, ordinal=k) for k in range(shards)]
        self.id_of: dict[tuple[int, int], int] = {}
        self.text_of: dict[int, str] = {}
        rows: list[list[tuple[int, str]]] = [[] for _ in range(shards)]
        for g, i, text in placed:
            k = rng.randrange(shards)
            doc = document_id(k, len(rows[k]))
            rows[k].append((doc, text))
            self.id_of.setdefault((g, i), doc)
            self.text_of[doc] = text
        self.exact_removed: set[int] = set()
        self.shards = []
        for k, file in enumerate(self.files):
            ids = [doc for doc, _ in rows[k]]
            table = pa.table({"id": pa.array(ids, pa.int64()), "source": [file.source] * len(ids),
                              "text": pa.array([t for _, t in rows[k]], pa.large_string()), "meta": ["{}"] * len(ids)})
            key = f"docs/{file.source}/{file.shard}.parquet"
            write_table(store, key, table)
            self.shards.append((file, key))
        # exact duplicates: the later of two identical documents, as the exact stage records it
        by_text: dict[str, list[int]] = {}
        for doc, text in self.text_of.items():
            by_text.setdefault(text, []).append(doc)
        for docs in by_text.values():
            self.exact_removed.update(sorted(docs)[1:])
        exact = np.array(sorted(self.exact_removed), dtype=np.int64)
        removed_ids = removals.exact_removed_ids(1, len(self.files))  # one hash range found them all
        removals.write_removed(store, removed_ids, 0, exact, exact)
        removals.merge_block(store, removed_ids, layout.exact_merged, 0)
        self.groups = [[self.id_of[(g, i)] for i in range(len(group))] for g, group in enumerate(groups)]

    def docs_shards(self) -> list[DocsShard]:
        return [DocsShard(file, key, exclude=True, size=1) for file, key in self.shards]

    def removed(self, store: Store) -> dict[int, int]:
        """id -> kept_id over every docs shard."""
        result = {}
        for file, _ in self.shards:
            ids, kept = removed_pairs(store, layout.near_merged, file)
            result.update(zip(ids.tolist(), kept.tolist()))
        return result


def inline_run(store: Store, executed: list[tuple[str, str]] | None = None):
    """tasks.fanout.run_stage in this process, recording the (stage, shard) pairs that ran."""

    def run(stage):
        if executed is not None:
            work = stage.work

            def recorded(item):
                executed.append((stage.name, stage.shard_of(item)))
                return work(item)

            stage = dataclasses.replace(stage, work=recorded)
        return run_stage(store, stage, inline=True)

    return run


def ray_run(store: Store, max_in_flight: int | None = None):
    return partial(run_stage, store, max_in_flight=max_in_flight)


def outputs(store: LocalStore, prefix: str = "dedup/near/") -> dict[str, bytes]:
    return {key: store.get_bytes(key) for key in store.list(prefix)}


# -- shingles and signatures --------------------------------------------------------------


TEXTS = [
    "The Quick, brown fox -- jumps over the lazy dog!\n\nAnd then\tsome MORE words follow here.",
    "short",
    "",
    "!!! ... ???",
    "word " * 40,
    "Ünïcödé tëxt wïth äccents, ΕΛΛΗΝΙΚΆ and 漢字 and emoji 🙂🙂 in it.",
]


@pytest.mark.parametrize("words,n", [(False, 13), (False, 5), (True, 5), (True, 2)])
def test_shingle_sets_match_a_python_reference(monkeypatch, words, n):
    # tiny pieces, so long texts exercise the overlapping-piece path too
    monkeypatch.setattr(minhash, "PIECE_CHARS", 37)
    monkeypatch.setattr(minhash, "PIECE_WORDS", 3)
    rng = random.Random(3)
    texts = TEXTS + [" ".join(rng.choice(["ab", "c", "def", "gh"]) for _ in range(rng.randint(0, 60))) for _ in range(20)]
    hasher = MinHasher(n, words, 16, seed=5)
    sets = hasher.shingle_sets(texts)
    for text, got in zip(texts, sets):
        expected = sorted({reference_hash(hasher, s) for s in reference_shingles(text, n, words)})
        assert got.tolist() == expected, text


def test_long_text_pieces_give_the_same_signature(monkeypatch):
    rng = random.Random(4)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) + str(rng.randint(0, 99)) for _ in range(3000))
    for words in (False, True):
        hasher = MinHasher(13 if not words else 3, words, 64, seed=1)
        whole = hasher.signatures([text, "x" * 20])
        monkeypatch.setattr(minhash, "PIECE_CHARS", 500)
        monkeypatch.setattr(minhash, "PIECE_WORDS", 40)
        assert np.array_equal(hasher.signatures([text, "x" * 20]), whole)
        monkeypatch.undo()


def test_signature_golden_values():
    """Signatures are a pure function of text and seed: these values must never change."""
    hasher = MinHasher(13, False, 128, seed=1)
    signatures = hasher.signatures(TEXTS)
    bands = hasher.band_hashes(signatures, 9, 13)
    assert signatures.dtype == np.uint32 and bands.dtype == np.uint64
    assert signatures[0, :4].tolist() == GOLDEN_FIRST
    assert hashlib.sha256(signatures.astype("<u4").tobytes()).hexdigest() == GOLDEN_SIGNATURES
    assert hashlib.sha256(bands.astype("<u8").tobytes()).hexdigest() == GOLDEN_BANDS
    other_seed = MinHasher(13, False, 128, seed=2).signatures(TEXTS[:1])
    assert not np.array_equal(other_seed, signatures[:1])


GOLDEN_FIRST = [121982794, 46649782, 23004088, 132955316]
GOLDEN_SIGNATURES = "36dae84286e9bd60a3fe0fd8f1a9362a476d99bb767fedcc26ef9128b427b593"
GOLDEN_BANDS = "e7f0e8a86294fc2744a57ef2d83f1a00a7460145b60c07856234795684676b72"


def test_signatures_estimate_jaccard():
    """Agreement of signature values estimates Jaccard with the binomial error of ideal
    random permutations."""
    rng = random.Random(11)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(2000)]
    hasher = MinHasher(13, False, 128, seed=1)
    errors, z_scores = [], []
    for level in (0.3, 0.5, 0.7, 0.8, 0.9):
        for _ in range(8):
            a = random_text(rng, vocabulary, 200)
            b = edited(rng, vocabulary, a, level)
            truth = true_jaccard(a, b)
            estimate = float(np.mean(np.equal(*hasher.signatures([a, b]))))
            errors.append(estimate - truth)
            z_scores.append((estimate - truth) / np.sqrt(max(truth * (1 - truth), 1e-3) / 128))
    assert abs(np.mean(errors)) < 0.015  # unbiased
    assert 0.6 < np.std(z_scores) < 1.4  # the binomial spread, not more


def test_word_shingles_find_near_duplicates():
    rng = random.Random(12)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(2000)]
    hasher = MinHasher(5, True, 128, seed=1)
    a = random_text(rng, vocabulary, 400)
    b = " ".join(a.split(" ")[:390] + ["new"] * 10)
    c = random_text(rng, vocabulary, 400)
    sa, sb, sc = hasher.signatures([a, b, c])
    assert np.mean(sa == sb) > 0.8 and np.mean(sa == sc) < 0.05


# -- LSH and components -------------------------------------------------------------------


def test_bands_rows_from_threshold():
    # the values datasketch's _optimal_param gives; 9 x 13 is SlimPajama's choice
    assert lsh.optimal_bands_rows(0.8, 128) == (9, 13)
    assert lsh.optimal_bands_rows(0.5, 128) == (25, 5)
    assert lsh.optimal_bands_rows(0.9, 64) == (3, 21)
    assert bands_rows(MinHashConfig(bands=None, rows=None, threshold=0.7, num_perm=256)) == (25, 10)
    with pytest.raises(ValueError, match="bands and rows"):
        MinHashConfig(bands=None, rows=13)
    with pytest.raises(ValueError, match="exceed num_perm"):
        MinHashConfig(bands=10, rows=13)


def test_buckets_link_members_to_the_smallest_id():
    hashes = np.array([5, 5, 5, 9, 7, 7, 5], dtype=np.uint64)
    ids = np.array([30, 10, 20, 40, 50, 60, 10], dtype=np.int64)
    members, starts = lsh.group_buckets(hashes, ids)
    assert members.tolist() == [10, 20, 30, 50, 60] and starts.tolist() == [0, 3]
    first, second = lsh.star_edges(members, starts)
    assert sorted(zip(first.tolist(), second.tolist())) == [(20, 10), (30, 10), (60, 50)]
    # a repeated member set (the same pair in another band) is verified once
    m2, s2 = lsh.distinct_buckets(np.array([1, 2, 1, 2, 1, 3]), np.array([0, 2, 4]))
    assert m2.tolist() == [1, 2, 1, 3] and s2.tolist() == [0, 2]


def test_verification_links_through_anchors():
    # 1 resembles nobody; 2 resembles 3 only; 4 resembles 1. The smallest id is 1.
    similar = {frozenset(p) for p in [(2, 3), (1, 4)]}
    members, starts = np.array([1, 2, 3, 4, 5]), np.array([0])
    first, second, comparisons = lsh.verified_edges(
        members, starts, lambda a, b: 1.0 if frozenset((a, b)) in similar else 0.0, 0.8, anchors=4
    )
    assert sorted(zip(first.tolist(), second.tolist())) == [(3, 2), (4, 1)]
    # with a single anchor, a member is only ever compared with the smallest id
    first, _, comparisons = lsh.verified_edges(members, starts, lambda a, b: 1.0 if frozenset((a, b)) in similar else 0.0, 0.8, anchors=1)
    assert first.tolist() == [4] and comparisons == 4


def union_find_roots(n: int, edges: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return [find(x) for x in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_star_rounds_match_union_find(seed):
    """Partitioned large-star/small-star, as the stage runs it, against union-find."""
    rng = np.random.default_rng(seed)
    n, partitions = 300, 4
    if seed % 2:  # long chains: the hard case for label propagation
        perm = rng.permutation(n)
        edges = list(zip(perm[:-1].tolist(), perm[1:].tolist()))[: n - 20]
    else:
        edges = [tuple(e) for e in rng.integers(0, n, size=(n // 2, 2)).tolist() if e[0] != e[1]]
    first = np.array([a for a, b in edges] + [b for a, b in edges], dtype=np.int64)
    second = np.array([b for a, b in edges] + [a for a, b in edges], dtype=np.int64)
    rounds = 0
    while True:
        rounds += 1
        changed = 0
        large = [components.large_star(first[p == q], second[p == q]) for p in [components.partition_of(first, partitions)] for q in range(partitions)]
        big = np.concatenate([x for x, _, _ in large])
        small_ = np.concatenate([y for _, y, _ in large])
        changed += sum(c for _, _, c in large)
        p = components.partition_of(big, partitions)
        small = [components.small_star(big[p == q], small_[p == q]) for q in range(partitions)]
        big = np.concatenate([x for x, _, _ in small])
        small_ = np.concatenate([y for _, y, _ in small])
        changed += sum(c for _, _, c in small)
        first, second = np.concatenate([big, small_]), np.concatenate([small_, big])
        if changed == 0:
            break
        assert rounds < 30
    roots = union_find_roots(n, edges)
    leaf = first > second
    got = dict(zip(first[leaf].tolist(), second[leaf].tolist()))
    expected = {v: r for v, r in enumerate(roots) if r != v}
    assert got == expected
    assert len(first[leaf]) == len(set(first[leaf].tolist()))  # one edge per removed vertex


# -- the whole stage ----------------------------------------------------------------------


def test_near_dedup_finds_planted_duplicates(store):
    corpus = Corpus(store)
    counts = run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store), ONE_SHARD_BATCHES)
    removed = corpus.removed(store)

    similarity = {tuple(g): true_jaccard(corpus.text_of[g[0]], corpus.text_of[g[1]]) for g in corpus.groups if len(g) == 2}
    for level in LEVELS:  # every level was planted
        assert sum(level - 0.01 <= s <= level + 0.03 for s in similarity.values()) >= 8, level
    high = [pair for pair, s in similarity.items() if s >= 0.85]
    found = [pair for pair in high if removed.get(max(pair)) == min(pair)]
    assert len(high) >= 18 and len(found) / len(high) >= 0.95
    # nothing below the threshold is removed (verification drops those candidates)
    for pair, s in similarity.items():
        if s < 0.8:
            assert max(pair) not in removed and min(pair) not in removed, (pair, s)
    clusters = [g for g in corpus.groups if len(g) == 4]
    for cluster in clusters:
        assert {d: removed.get(d) for d in cluster} == {d: (None if d == min(cluster) else min(cluster)) for d in cluster}
    # every removal is a planted near-duplicate of its kept document's group; never an exact duplicate
    grouped = {d: tuple(g) for g in corpus.groups for d in g}
    assert all(grouped.get(d) is not None and k in grouped[d] for d, k in removed.items())
    assert not set(removed) & corpus.exact_removed

    sources = {f.ordinal: f.source for f, _ in corpus.shards}
    assert counts == {s: sum(1 for d in removed if sources[d >> 32] == s) for s in ("web", "code")}
    receipts = [read_record(store, key, Receipt) for key in store.list(f"receipts/{STAGE}/")]
    assert sum(r.counts["near_dup"] for r in receipts) == len(removed)
    for file, _ in corpus.shards:
        assert removed_pairs(store, layout.near_merged, file)[0].tolist() == sorted(d for d in removed if d >> 32 == file.ordinal)

    sample = read_table(store, layout.NEAR_SAMPLE).to_pylist()
    assert [row["id"] for row in sample] == sorted(removed)[: len(sample)] and len(sample) == min(100, len(removed))
    for row in sample:
        assert row["kept_id"] == removed[row["id"]] and row["kept_text"] == corpus.text_of[row["kept_id"]][:300]
        assert row["jaccard"] == pytest.approx(true_jaccard(corpus.text_of[row["id"]], corpus.text_of[row["kept_id"]]), abs=0.01)


def test_without_verification_buckets_become_edges(tmp_path):
    store = LocalStore(tmp_path)
    corpus = Corpus(store, seed=8)
    cfg = CONFIG.model_copy(update={"verify": False})
    run_near_dedup(store, corpus.docs_shards(), cfg, inline_run(store), ONE_SHARD_BATCHES)
    removed = corpus.removed(store)
    assert not list(store.list("dedup/near/shingles/"))
    for cluster in (g for g in corpus.groups if len(g) == 4):
        assert all(removed.get(d) == min(cluster) for d in cluster if d != min(cluster))


def test_same_result_serial_and_on_ray(tmp_path, ray_local, monkeypatch):
    """Byte-identical outputs in-process, on one Ray worker at a time, and on two (with several
    verify groups and spans)."""
    monkeypatch.setattr("tasks.shuffle.MERGE_FAN_IN", 2)  # merge levels in every shuffle (passed to the workers)
    results = []
    for name, make in (
        ("serial", inline_run),
        ("ray-1", lambda store: ray_run(store, max_in_flight=1)),
        ("ray-2", ray_run),
    ):
        store = LocalStore(tmp_path / name)
        corpus = Corpus(store, seed=9)
        run_near_dedup(store, corpus.docs_shards(), CONFIG, make(store), ONE_SHARD_BATCHES, TIGHT_BUDGET)
        results.append(outputs(store))
    assert results[0] == results[1] == results[2] and any("removed/" in k for k in results[0])
    assert sum("edges/v" in k for k in results[0]) > 1
    assert any(k.startswith(layout.near_runs("candidates", 1)) for k in results[0])
    assert any(k.startswith(layout.near_runs("shingles", 1)) for k in results[0])
    assert any(k.startswith(layout.near_runs("bands", 1)) for k in results[0])


def test_each_map_task_writes_one_object_and_batches_find_the_same(tmp_path):
    """A shuffle's map task writes one `.parts` object with a partition per reduce task, whatever
    the batch size or partition count, and the removed documents do not change."""
    found = []
    for name, batch_bytes in (("per-shard", ONE_SHARD_BATCHES), ("one-batch", 1 << 30)):
        store = LocalStore(tmp_path / name)
        corpus = Corpus(store, seed=11)
        batches = docs_batches(corpus.docs_shards(), batch_bytes)
        run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store), batch_bytes)
        for prefix, tasks, partitions, schema in (
            (layout.NEAR_BANDS, len(batches), CONFIG.bucket_partitions, BANDS_SCHEMA),
            (layout.NEAR_CANDIDATES, CONFIG.bucket_partitions, len(batches), CANDIDATES_SCHEMA),
            (layout.NEAR_SHINGLES, len(batches), CONFIG.bucket_partitions, SHINGLES_SCHEMA),  # a verify group a range
            (layout.near_components(0, "large"), CONFIG.component_partitions, CONFIG.component_partitions, EDGES_SCHEMA),
        ):
            keys = list(store.list(prefix))
            assert len(keys) == tasks, (prefix, keys)
            for key in keys:
                read_partition(store, key, partitions - 1, schema)
                with pytest.raises(ValueError, match="no partition"):
                    read_partition(store, key, partitions, schema)
        found.append(corpus.removed(store))
    assert len(docs_batches(corpus.docs_shards(), ONE_SHARD_BATCHES)) == 4
    assert found[0] == found[1] and found[0]


def test_verify_groups_are_sized_from_the_candidates_shingles_and_find_the_same(tmp_path):
    """A budget smaller than a range's candidates splits its buckets into verify groups; each
    group's planned bytes (memberships x shingle bytes) stay inside the budget, each group holds
    whole buckets, and the removed documents do not change."""
    found, groups = [], {}
    for name, budget in (("roomy", 1 << 30), ("tight", 1 << 18)):
        store = LocalStore(tmp_path / name)
        corpus = Corpus(store, seed=12)
        run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store), ONE_SHARD_BATCHES, budget)
        signed = [read_record(store, k, Receipt) for k in store.list(layout.receipts("near-signatures"))]
        per_document = sum(r.counts["shingles"] for r in signed) / sum(r.counts["signed"] for r in signed)
        member_bytes = verify_member_bytes(per_document)
        bucket_files = list(store.list(layout.NEAR_BUCKETS))
        groups[name] = len(bucket_files)
        seen_buckets = set()
        for key in bucket_files:
            table = read_table(store, key)
            assert table.num_rows * member_bytes <= budget
            buckets = {(key.rsplit("/", 1)[1][:5], b) for b in table.column("bucket").to_pylist()}
            assert not buckets & seen_buckets  # a bucket is verified in one group only
            seen_buckets |= buckets
        assert len(list(store.list(layout.receipts("near-verify")))) == len(verify_spans(groups[name]))
        found.append(corpus.removed(store))
    assert groups["roomy"] == CONFIG.bucket_partitions < groups["tight"]
    assert found[0] == found[1] and found[0]


class S3Calls:
    """The (operation, key) of every S3 call this process's client makes while inside (botocore's
    event hooks); the stages run inline, so that is every call of every task."""

    def __enter__(self):
        from storage.s3 import s3_client

        self.events = s3_client().meta.events
        self.calls: list[tuple[str, str]] = []
        self.events.register("before-parameter-build.s3", self._record)
        return self

    def _record(self, params, model, **_):
        self.calls.append((model.name, params.get("Key", params.get("Prefix", ""))))

    def __exit__(self, *_):
        self.events.unregister("before-parameter-build.s3", self._record)

    def count(self, operation: str, prefix: str) -> int:
        return sum(1 for op, key in self.calls if op == operation and f"/{prefix}" in key)


def verify_reads(calls: S3Calls) -> int:
    prefixes = (layout.NEAR_CANDIDATES, layout.NEAR_SHINGLES, near_runs_of("candidates"), near_runs_of("shingles"))
    return sum(calls.count("GetObject", prefix) for prefix in prefixes)


def near_runs_of(name: str) -> str:
    """The folder of every merge level of one near-dedup shuffle."""
    return layout.near_runs(name, 0).removesuffix("l00/")


def near_shuffle(name: str, map_key, schema: pa.Schema, maps: int, partitions: int, span: int, fan_in: int) -> MergedShuffle:
    """A near-dedup shuffle as run_near_dedup makes it, with an explicit fan-in."""
    return MergedShuffle(f"near-runs-{name}", partial(layout.near_runs, name), map_key, schema, maps, partitions, span, fan_in)


def merged_reads_bound(shuffle: MergedShuffle) -> int:
    """2 x FAN_IN range reads per object a merge level writes (at most maps + reduce tasks),
    and per reduce task."""
    return 2 * shuffle.fan_in * (shuffle.levels * (shuffle.maps + shuffle.reducers) + shuffle.reducers)


def test_verify_reads_grow_with_batches_plus_groups_not_their_product(s3_bucket_uri, monkeypatch):
    """The verify path's range reads (candidates and shingles, with their merge levels) stay
    within 2 x FAN_IN x (levels x (maps + reduce tasks) + reduce tasks) per shuffle, where they
    were 2 x maps x reduce tasks (no merge level: 16 batches with a fan-in of 16); the removed
    documents are the same."""
    monkeypatch.setattr(steps, "VERIFY_SPAN_GROUPS", 1)  # a verify task per group
    reads, shapes, found = {}, {}, []
    for name, shards, fan_in in (("merged", 16, 2), ("direct", 16, 16)):
        monkeypatch.setattr("tasks.shuffle.MERGE_FAN_IN", fan_in)
        store = open_store(f"{s3_bucket_uri}/verify-reads-{name}")
        corpus = Corpus(store, shards=shards, seed=12)
        with S3Calls() as calls:
            run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store), ONE_SHARD_BATCHES, TIGHT_BUDGET)
        groups = len(list(store.list(layout.NEAR_BUCKETS)))
        candidates = near_shuffle("candidates", layout.near_candidates, CANDIDATES_SCHEMA, CONFIG.bucket_partitions, shards, 1, fan_in)
        shingles = near_shuffle("shingles", layout.near_shingles, SHINGLES_SCHEMA, shards, groups, 1, fan_in)
        reads[name], shapes[name] = verify_reads(calls), (groups, candidates.levels, shingles.levels)
        for merged in (candidates, shingles):  # a level's objects hold ~one map object's rows each
            for level in range(1, merged.levels + 1):
                objects = len(list(store.list(merged.runs_folder(level))))
                assert objects == len(merged.merges(level)) <= merged.maps + merged.reducers
        assert reads[name] <= merged_reads_bound(candidates) + merged_reads_bound(shingles), (name, shapes[name], reads[name])
        found.append(corpus.removed(store))
    groups = shapes["merged"][0]
    assert groups >= 8 * CONFIG.bucket_partitions and shapes == {"merged": (groups, 1, 3), "direct": (groups, 0, 0)}
    assert reads["direct"] >= 16 * groups  # an offsets read of every batch's shingles for every group, at least
    assert reads["merged"] < 0.6 * reads["direct"], reads  # at 16 batches; the gap grows with them
    assert found[0] == found[1] and found[0]


@pytest.mark.parametrize("maps, partitions, span", [(1, 5, 1), (4, 3, 16), (17, 40, 1), (40, 17, 3), (5_588, 13_894, 16)])
def test_merge_levels_nest_and_reduce_tasks_read_few_objects(maps, partitions, span):
    """Blocks cut their parent block into consecutive pieces covering every reduce task once, a
    level's objects number at most maps + reduce tasks, a reduce task reads at most FAN_IN
    objects, and the reads stay within merged_reads_bound: at the full build's shape (1 GiB
    budget) ~0.4M where reading every batch for every span is ~9.7M."""
    shuffle = near_shuffle("shingles", layout.near_shingles, SHINGLES_SCHEMA, maps, partitions, span, MERGE_FAN_IN)
    fan_in, reducers = shuffle.fan_in, shuffle.reducers
    reads = 0
    for level in range(1, shuffle.levels + 1):
        blocks, parents = shuffle.blocks(level), shuffle.blocks(level - 1)
        assert [r for _, block in blocks for r in block] == list(range(reducers))
        assert all(set(block) <= set(parents[parent][1]) for parent, block in blocks)
        assert len(shuffle.merges(level)) <= maps + reducers
        reads += 2 * sum(min(fan_in, shuffle.runs(level - 1) - run * fan_in) for _, run, _ in shuffle.merges(level))
    for reducer in range(reducers):
        keys, first = shuffle.sources(reducer * span)
        assert len(keys) <= fan_in and len(set(keys)) == len(keys) and first >= 0
        reads += 2 * len(keys)
    assert reads <= merged_reads_bound(shuffle)
    if maps == 5_588:
        assert shuffle.levels == 3 and reads < 0.05 * 2 * maps * reducers, reads


def test_spills_read_in_pieces_find_the_same(tmp_path, monkeypatch):
    """Merge levels and spills read in many small pieces give the removed documents of one
    direct read per object."""
    found = []
    for name, fan_in, piece in (("direct", 16, 16 << 20), ("pieces", 2, 512)):
        monkeypatch.setattr("tasks.shuffle.MERGE_FAN_IN", fan_in)
        monkeypatch.setattr("tasks.shuffle.SPILL_PIECE_BYTES", piece)
        store = LocalStore(tmp_path / name)
        corpus = Corpus(store, seed=14)
        run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store), ONE_SHARD_BATCHES, TIGHT_BUDGET)
        found.append(corpus.removed(store))
    assert found[0] == found[1] and found[0]


def union_find_removed(ids: list[int], pairs: list[tuple[int, int]]) -> set[int]:
    """Documents with a smaller id in their connected component."""
    index = {d: i for i, d in enumerate(ids)}
    roots = union_find_roots(len(ids), [(index[a], index[b]) for a, b in pairs])
    return {ids[i] for i, root in enumerate(roots) if root != i}


def test_precision_and_recall_against_all_pairs(tmp_path, monkeypatch):
    """Against the exact all-pairs truth (Python sets of 13-grams, every pair of documents that
    exact dedup kept), with many verify groups in several spans."""
    monkeypatch.setattr(steps, "VERIFY_SPAN_GROUPS", 3)
    store = LocalStore(tmp_path)
    corpus = Corpus(store, seed=13)
    run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store), ONE_SHARD_BATCHES, TIGHT_BUDGET)
    assert len(list(store.list(layout.receipts("near-verify")))) > 3
    docs = sorted(d for d in corpus.text_of if d not in corpus.exact_removed)
    sets = [reference_shingles(corpus.text_of[d], 13, False) for d in docs]
    similar = [
        (docs[i], docs[j]) for i in range(len(docs)) for j in range(i + 1, len(docs))
        if len(sets[i] & sets[j]) >= 0.8 * len(sets[i] | sets[j])
    ]
    truth = union_find_removed(docs, similar)
    removed = set(corpus.removed(store))
    hit = len(removed & truth)
    assert len(truth) >= 30 and hit / len(removed) >= 0.99 and hit / len(truth) >= 0.95, (len(removed), len(truth), hit)


def test_rerun_skips_finished_work(tmp_path):
    store = LocalStore(tmp_path)
    corpus = Corpus(store, seed=10)
    executed: list[tuple[str, str]] = []
    run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store, executed), ONE_SHARD_BATCHES)
    before = outputs(store)
    assert ("near-signatures", "b000000") in executed and (STAGE, "q0000") in executed

    executed.clear()
    run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store, executed), ONE_SHARD_BATCHES)
    assert executed == []

    # a lost output or receipt: only that task runs again, and the results are the same
    store.delete(layout.near_bands(2))
    store.delete(layout.receipt(STAGE, "q0001"))
    run_near_dedup(store, corpus.docs_shards(), CONFIG, inline_run(store, executed), ONE_SHARD_BATCHES)
    assert executed == [("near-signatures", "b000002"), (STAGE, "q0001")]
    assert outputs(store) == before


def test_ids_outside_their_plan_file_are_an_error(tmp_path):
    store = LocalStore(tmp_path)
    file = PlannedFile(source="web", uri="file:///in/a.jsonl", size=1, ordinal=3)
    write_table(store, "docs/web/000003.parquet", pa.table({"id": pa.array([document_id(4, 0)], pa.int64()), "text": ["x" * 30]}))
    with pytest.raises(ValueError, match=r"docs/web/000003.parquet.*does not belong to plan file 3"):
        run_near_dedup(store, [DocsShard(file, "docs/web/000003.parquet")], CONFIG, inline_run(store), ONE_SHARD_BATCHES)

