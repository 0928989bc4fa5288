"""Every key of a dataset build, in one place. Keys are relative to the build folder
`<store>/datasets/<name>/<build>/`:

```
plan.json                                     the frozen inputs (stage plan)
docs/<source>/<shard>.parquet                 documents: id, source, text, meta (ingest)
quarantine/<source>/<shard>.jsonl             malformed records with file, line/row, reason (ingest)
dedup/exact/hashes/b<batch>.parts             content hashes of a batch of docs shards, a partition per hash range
dedup/exact/runs/hashes/lNN/r<run>-k<block>.parts
                                              merge level NN of the hashes shuffle (tasks.shuffle.MergedShuffle)
dedup/exact/removed/p<P>.parts                ids hash range P removed (id, kept_id), a partition per block of 64 plan files
dedup/exact/runs/removed/lNN/r<run>-k<block>.parts
                                              merge level NN of the removed-ids shuffle
dedup/exact/merged/k<block>.parts             a block's removed ids merged, sorted, a partition per plan file of the block
dedup/near/bands/b<batch>.parts               band hashes of a batch of docs shards, a partition per band-hash range
dedup/near/buckets/p<P>-g<G>.parquet          LSH buckets of one range, in verify groups G (with verification)
dedup/near/candidates/p<P>.parts              a range's candidates (id, group), a partition per batch
dedup/near/shingles/b<batch>.parts            32-bit hashed shingles of a batch's candidates, a partition per verify group (in
                                              range order, so a verify span's groups are one byte range)
dedup/near/runs/<shuffle>/lNN/r<run>-k<block>.parts
                                              merge level NN of a shuffle (bands, candidates, shingles, edges,
                                              rNNN-{large,small}, removed): a run of FAN_IN^NN map objects, the partitions
                                              of a block of reduce tasks
dedup/near/edges/<source>.parts               similar pairs from range p<P> (or verify span v<first group>), a partition per vertex partition
dedup/near/components/rNNN/{large,small}/q<from>.parts   connected-components rounds, a partition per vertex partition
dedup/near/removed/q<Q>.parts                 ids vertex partition Q removed (id, kept_id), a partition per block of 64 plan files
dedup/near/merged/k<block>.parts              a block's removed ids merged, sorted, a partition per plan file of the block
dedup/near/sample.parquet                     the first removed documents beside the ones kept
tokenizer/sample/<shard>.txt                  the tokenizer's training sample, per group of sampled docs shards (named by its first)
tokenizer/tokenizer.model, tokenizer.json     the SentencePiece model and its fingerprint
tokens/<source>/<shard>-NNNN.{bin,idx}        Megatron indexed token shards
receipts/<stage>/<shard>.json                 one per finished shard of a stage: outputs, versions, counts
summaries/<stage>.parquet                     every receipt of a completed stage, a typed row each (storage.stage_summary)
manifest.json                                 the build's header: tokenizer, config, accounting, totals, the shard table's checksum
manifest.shards.parquet                       the shard table: a row per token shard (counts, sizes, sha256s), in build order
```

A `.parts` object is one map task's output of a shuffle, one parquet table per partition
behind an offsets header (tasks.parquet_io.write_partitions): a step writes one object per
map task, not one per map task and partition. Removed ids are shuffled to blocks of plan
files and merged once per block, so a reader of one docs shard reads one partition of one
object (two range reads) whatever the number of dedup tasks. Stages ask this module for keys;
none imports another stage to find a file.
"""

from __future__ import annotations

from storage.store import join_key

PLAN = "plan.json"
MANIFEST = "manifest.json"
SHARD_TABLE = "manifest.shards.parquet"
TOKENIZER_MODEL = "tokenizer/tokenizer.model"
TOKENIZER_INFO = "tokenizer/tokenizer.json"
TOKENIZER_SAMPLE = "tokenizer/sample/"
DOCS = "docs/"
QUARANTINE = "quarantine/"
TOKENS = "tokens/"
EXACT = "dedup/exact"
NEAR = "dedup/near"
NEAR_SAMPLE = join_key(NEAR, "sample.parquet")
SUMMARIES = "summaries/"
SUMMARY_SUFFIX = ".parquet"


def docs(source: str, shard: str) -> str:
    return join_key(DOCS, source, f"{shard}.parquet")


def quarantine(source: str, shard: str) -> str:
    return join_key(QUARANTINE, source, f"{shard}.jsonl")


def tokens(source: str, shard: str, part: int) -> str:
    """A token shard's prefix, without `.bin` / `.idx`."""
    return join_key(TOKENS, source, f"{shard}-{part:04d}")


def tokenizer_sample(shard: str) -> str:
    return join_key(TOKENIZER_SAMPLE, f"{shard}.txt")


def receipts(stage: str) -> str:
    return join_key("receipts", stage) + "/"


def receipt(stage: str, shard: str) -> str:
    return join_key("receipts", stage, f"{shard}.json")


def summary(stage: str) -> str:
    return join_key(SUMMARIES, f"{stage}{SUMMARY_SUFFIX}")


def batch_name(batch: int) -> str:
    return f"b{batch:06d}"


def partition_name(partition: int) -> str:
    return f"p{partition:04d}"


def vertex_partition_name(partition: int) -> str:
    return f"q{partition:04d}"


# Removed ids are shuffled to blocks of consecutive plan files, not to single docs shards: a
# merge task and object per docs shard would be ~60,000 tiny ones at SlimPajama's size. A merge
# task per block writes one object with a partition per plan file, which every reader of a docs
# shard reads (two range reads).
REMOVED_BLOCK_FILES = 64


def removed_block(ordinal):
    """The block of a plan file's ordinal (or of an array of them)."""
    return ordinal // REMOVED_BLOCK_FILES


def removed_block_partition(ordinal):
    """The partition of a plan file (or of an array of them) in its block's merged object."""
    return ordinal % REMOVED_BLOCK_FILES


def removed_blocks(plan_files: int) -> int:
    return -(-plan_files // REMOVED_BLOCK_FILES)


def removed_block_name(block: int) -> str:
    return f"k{block:06d}"


def verify_group_name(partition: int, group: int) -> str:
    """A verify group: a share of a band-hash range, whole buckets, sized from their candidates."""
    return f"{partition_name(partition)}-g{group:04d}"


def verify_span_name(first_group: int) -> str:
    """One verify task: consecutive verify groups (in range order) from this global index on."""
    return f"v{first_group:06d}"


# -- exact dedup --------------------------------------------------------------------------

EXACT_HASHES = join_key(EXACT, "hashes") + "/"
EXACT_REMOVED = join_key(EXACT, "removed") + "/"
EXACT_MERGED = join_key(EXACT, "merged") + "/"
EXACT_RUNS = join_key(EXACT, "runs") + "/"


def exact_hashes(batch: int) -> str:
    return join_key(EXACT_HASHES, f"{batch_name(batch)}.parts")


def exact_removed(partition: int) -> str:
    """The exact-duplicate ids one hash range found, a partition per block of plan files."""
    return join_key(EXACT_REMOVED, f"{partition_name(partition)}.parts")


def exact_runs(shuffle: str, level: int) -> str:
    return join_key(EXACT_RUNS, shuffle, f"l{level:02d}") + "/"


def exact_merged(block: int) -> str:
    """One block's exact-duplicate ids merged, a partition per plan file of the block."""
    return join_key(EXACT_MERGED, f"{removed_block_name(block)}.parts")


# -- near dedup ---------------------------------------------------------------------------

NEAR_BANDS = join_key(NEAR, "bands") + "/"
NEAR_BUCKETS = join_key(NEAR, "buckets") + "/"
NEAR_CANDIDATES = join_key(NEAR, "candidates") + "/"
NEAR_SHINGLES = join_key(NEAR, "shingles") + "/"
NEAR_RUNS = join_key(NEAR, "runs") + "/"
NEAR_EDGES = join_key(NEAR, "edges") + "/"
NEAR_REMOVED = join_key(NEAR, "removed") + "/"
NEAR_MERGED = join_key(NEAR, "merged") + "/"


def near_bands(batch: int) -> str:
    return join_key(NEAR_BANDS, f"{batch_name(batch)}.parts")


def near_buckets(group: str) -> str:
    return join_key(NEAR_BUCKETS, f"{group}.parquet")


def near_candidates(partition: int) -> str:
    return join_key(NEAR_CANDIDATES, f"{partition_name(partition)}.parts")


def near_shingles(batch: int) -> str:
    return join_key(NEAR_SHINGLES, f"{batch_name(batch)}.parts")


def near_runs(shuffle: str, level: int) -> str:
    return join_key(NEAR_RUNS, shuffle, f"l{level:02d}") + "/"


def merge_run(level_folder: str, run: int, block: int) -> str:
    """An object of a shuffle's merge level (exact_runs, near_runs): a run of consecutive map
    objects, for one block of consecutive reduce tasks."""
    return join_key(level_folder, f"r{run:06d}-k{block:06d}.parts")


def near_edges(source: str) -> str:
    """Edges found by one bucket range (partition_name) or verify span, by vertex partition."""
    return join_key(NEAR_EDGES, f"{source}.parts")


def near_components(round_: int, step: str) -> str:
    return join_key(NEAR, "components", f"r{round_:03d}", step) + "/"


def near_star(round_: int, step: str, from_partition: int) -> str:
    """One vertex partition's output of a components round, by the vertex partition it is for."""
    return join_key(near_components(round_, step), f"{vertex_partition_name(from_partition)}.parts")


def near_removed(partition: int) -> str:
    """The near-duplicate ids one vertex partition found, a partition per block of plan files."""
    return join_key(NEAR_REMOVED, f"{vertex_partition_name(partition)}.parts")


def near_merged(block: int) -> str:
    """One block's near-duplicate ids merged, a partition per plan file of the block."""
    return join_key(NEAR_MERGED, f"{removed_block_name(block)}.parts")
