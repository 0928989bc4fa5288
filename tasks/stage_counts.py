"""What each stage counts per shard: one typed record per stage (storage.manifest.Counts).

A stage's work returns `ShardResult(counts=<its record>)`; a misspelt or missing count fails
when the record is made. A later step reads a completed stage's counts back as the same record
(`StageSummary.totals(SignatureCounts).signed`, `.per_shard(BucketCounts)`), never by a name
string; the build's display sums whatever the records hold (tasks.step_result.StepRun).
"""

from __future__ import annotations

from storage.manifest import Counts


class IngestCounts(Counts):
    """ingest: one planned file. docs_in = kept + filtered + malformed; excluded is the part of
    filtered that a source's filter excluded (the rest were too short)."""

    docs_in: int
    kept: int
    filtered: int
    malformed: int
    bytes_in: int  # of the kept documents' text
    excluded: int
    nul_stripped: int  # kept documents that had NUL characters removed


class HashedCounts(Counts):
    """exact-hash: one batch of docs shards."""

    documents: int


class ExactDupCounts(Counts):
    """exact-dedup: one hash range."""

    exact_dup: int


class MergedCounts(Counts):
    """exact-merge, near-merge: one block of plan files' removed ids."""

    removed: int
    sources: int  # objects its block's partition was read from (at most MERGE_FAN_IN)


class SignatureCounts(Counts):
    """near-signatures: one batch of docs shards."""

    documents: int
    excluded: int  # too short to sign
    signed: int
    shingles: int


class BucketCounts(Counts):
    """near-buckets: one band-hash range. Without verification it writes edges; with it, the
    range's buckets split into verify groups."""

    buckets: int
    members: int
    edges: int | None = None
    verify_groups: int | None = None


class CandidateCounts(Counts):
    """near-shingles: one batch's candidates."""

    candidates: int


class ShuffleMergeCounts(Counts):
    """exact-runs-*, near-runs-*: one merge of a shuffle's runs (tasks.shuffle)."""

    runs: int
    partitions: int


class VerifyCounts(Counts):
    """near-verify: one span of verify groups."""

    groups: int
    comparisons: int
    edges: int


class StarCounts(Counts):
    """near-components-*: one vertex partition of a large- or small-star step."""

    edges_in: int
    changed: int  # edges that moved: components converged when a round changes none


class NearDupCounts(Counts):
    """near-dedup: one vertex partition's removed documents."""

    near_dup: int


class SampleCounts(Counts):
    """near-sample."""

    rows: int


class TokenizerSampleCounts(Counts):
    """tokenizer-sample: one group of docs shards' share of the training sample."""

    bytes: int


class TokenizerCounts(Counts):
    """tokenizer."""

    vocab_size: int


class TokenizeCounts(Counts):
    """tokenize: one planned file's token shards."""

    documents: int
    tokens: int
