"""Receipts as typed rows: a stage summary is one parquet table, a row per receipt, that gives
back every receipt exactly, catches a row edited in it, and does not depend on the order the
shards finished in; the driver keeps rows, not receipt objects, so its memory for a stage stays
nearly flat from 500 to 5,000 receipts, and a rerun of a finished stage reads the one summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from storage import build_layout as layout
from storage.manifest import Counts, ObjectInfo, Receipt, ShardResult, SourceAccounting, TokenShard, sha256_bytes
from storage.stage_summary import (
    COUNT,
    ReceiptRows,
    StageSummary,
    SummaryDamaged,
    in_order,
    receipt_row,
    row_intact,
    with_receipt_versions,
)
from storage.store import open_store
from tasks.fanout import run_stage
from tasks.stage import Stage
from tasks.stage_counts import BucketCounts, TokenizeCounts
from tests.builds import RequestCounter

ROOT = Path(__file__).resolve().parents[2]


class Numbered(Counts):
    n: int


class OddCounts(TokenizeCounts):
    odd: int | None = None  # only odd shards count it


def tokenize_receipt(shard: int) -> Receipt:
    """A receipt with every field set, as tokenize writes them (two token shards of two sources)."""
    token_shards = [
        TokenShard(
            prefix=f"tokens/{source}/{shard:06d}-0000", source=source, documents=shard + 1, tokens=10 * shard + 7,
            bin=ObjectInfo(key=f"tokens/{source}/{shard:06d}-0000.bin", size=20 * shard + 14, sha256=f"{shard:064x}"),
            idx=ObjectInfo(key=f"tokens/{source}/{shard:06d}-0000.idx", size=34, sha256=f"{shard + 1:064x}"),
        )
        for source in ("web", "code")
    ]
    outputs = [info for t in token_shards for info in (t.bin, t.idx)]
    return Receipt(
        stage="tokenize",
        shard=f"{shard:06d}",
        outputs=outputs,
        counts={"documents": 2 * shard + 2, "tokens": 20 * shard + 14} | ({"odd": 1} if shard % 2 else {}),
        sources={t.source: SourceAccounting(kept=t.documents, tokens=t.tokens) for t in token_shards},
        token_shards=token_shards,
        versions={o.key: {"etag": f"e{shard}-{i}"} for i, o in enumerate(outputs)},
        seconds=shard / 7,
    ).sealed()


def summary_of(receipts: list[Receipt], order: list[str]) -> StageSummary:
    rows = ReceiptRows()
    for receipt in receipts:
        rows.add(receipt_row(receipt))
    table = in_order(rows.table(), order)
    return StageSummary("tokenize", with_receipt_versions(table, [{"etag": f"r{shard}"} for shard in order]))


def test_a_row_gives_back_its_receipt_and_an_edited_row_fails_its_checksum():
    receipts = [tokenize_receipt(n) for n in range(5)]
    summary = StageSummary.from_parquet("tokenize", summary_of(receipts, [r.shard for r in receipts]).to_parquet())
    assert list(summary.receipts) == receipts and summary.receipts[3] == receipts[3]
    assert summary.edited() == []
    assert [c.odd for c in summary.per_shard(OddCounts)] == [None, 1, None, 1, None]
    assert summary.totals(OddCounts) == OddCounts(documents=30, tokens=sum(r.counts["tokens"] for r in receipts), odd=2)
    with pytest.raises(SummaryDamaged, match=r"\['odd'\] that TokenizeCounts does not declare"):
        summary.totals(TokenizeCounts)
    assert summary.sources()["code"] == sum((r.sources["code"] for r in receipts), SourceAccounting())
    assert summary.bytes_out == sum(o.size for r in receipts for o in r.outputs)

    table = summary.table
    tokens = table.column(COUNT + "tokens").to_pylist()
    tokens[2] += 1
    edited = StageSummary("tokenize", table.set_column(table.column_names.index(COUNT + "tokens"), COUNT + "tokens", pa.array(tokens)))
    assert edited.edited() == ["000002"]
    assert [row_intact(row) for row in edited.rows()] == [True, True, False, True, True]


def test_a_summary_is_not_taken_from_another_stage_or_another_table():
    body = summary_of([tokenize_receipt(0)], ["000000"]).to_parquet()
    with pytest.raises(ValueError, match="another stage"):
        StageSummary.from_parquet("ingest", body)
    with pytest.raises(ValueError, match="columns"):
        StageSummary.from_parquet("tokenize", StageSummary("tokenize", pa.table({"shard": ["000000"]})).to_parquet())


def test_the_summary_bytes_do_not_depend_on_the_order_shards_finished_in():
    """Workers finish shards in any order, and the runner batches rows as they come: one worker
    or several, the summary of the same receipts is the same bytes."""
    receipts = [tokenize_receipt(n) for n in range(2500)]  # rows are batched by the thousand
    order = [r.shard for r in receipts]
    in_plan_order = summary_of(receipts, order).to_parquet()
    assert summary_of(receipts[::-1], order).to_parquet() == in_plan_order
    assert summary_of(receipts[1::2] + receipts[::2], order).to_parquet() == in_plan_order


# The driver's bookkeeping of one stage, run inline in a fresh process: Python's allocations
# (tracemalloc's peak) plus Arrow's (its pool's peak), for a first run and a rerun.
MEASURE = """
import json, sys, tracemalloc
import pyarrow as pa
from storage.manifest import ShardResult, SourceAccounting
from storage.store import open_store
from tasks.fanout import run_stage
from tasks.stage import Stage
from tasks.stage_counts import TokenizeCounts

store, items = open_store(sys.argv[1]), int(sys.argv[2])

def work(i):
    return ShardResult(counts=TokenizeCounts(documents=i, tokens=2 * i), sources={"web": SourceAccounting(kept=i, tokens=2 * i)})

def stage(name, count):
    return Stage(name, list(range(count)), lambda i: f"{i:06d}", work, ())

run_stage(store, stage("warm-up", 20), inline=True)  # imports and caches, before measuring
run_stage(store, stage("warm-up", 20), inline=True)
tracemalloc.start()
run_stage(store, stage("measured", items), inline=True)
first = tracemalloc.get_traced_memory()[1]
tracemalloc.reset_peak()
run_stage(store, stage("measured", items), inline=True)
rerun = tracemalloc.get_traced_memory()[1]
print(json.dumps({"first": first, "rerun": rerun, "arrow": pa.default_memory_pool().max_memory()}))
"""
BYTES_PER_RECEIPT = 4096  # today: rows and a listing's few strings (~2.4 KB); receipt objects were ~9 KB


def driver_bytes(folder: Path, receipts: int) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), str(receipts)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_driver_memory_for_a_stage_stays_nearly_flat_from_500_to_5000_receipts(tmp_path):
    small, large = driver_bytes(tmp_path / "small", 500), driver_bytes(tmp_path / "large", 5000)
    arrow = large["arrow"] - small["arrow"]
    for run in ("first", "rerun"):
        growth = large[run] - small[run] + arrow
        assert growth < 4500 * BYTES_PER_RECEIPT, (run, small, large)


def test_a_rerun_of_a_finished_stage_reads_one_summary_not_its_receipts(s3_bucket_uri):
    store = open_store(f"{s3_bucket_uri}/rerun")
    stage = Stage("counted", list(range(60)), lambda i: f"{i:06d}", lambda i: ShardResult(counts=Numbered(n=i)), ())
    first = run_stage(store, stage, inline=True)
    counter = RequestCounter()
    again = run_stage(store, stage, inline=True)
    requests = counter.take()
    assert requests == {"ListObjectsV2": 1, "GetObject": 1}, requests  # receipts listed, the summary read
    assert again.to_parquet() == first.to_parquet() == store.get_bytes(layout.summary("counted"))
    assert again.totals(Numbered).n == sum(range(60)) and len(again) == 60


def test_a_row_edited_in_the_summary_is_read_from_its_receipt_and_an_edited_receipt_is_redone(tmp_path, caplog):
    store, ran = open_store(str(tmp_path)), []

    def work(i: int) -> ShardResult:
        ran.append(i)
        return ShardResult(counts=Numbered(n=i))

    stage = Stage("edited", list(range(4)), lambda i: f"{i:06d}", work, ())
    first = run_stage(store, stage, inline=True)
    table = first.table
    n = table.column(COUNT + "n").to_pylist()
    n[1] += 100
    edited = table.set_column(table.column_names.index(COUNT + "n"), COUNT + "n", pa.array(n))
    store.put_bytes(layout.summary("edited"), StageSummary("edited", edited).to_parquet())
    receipt = json.loads(store.get_bytes(layout.receipt("edited", "000002")))
    receipt["counts"]["n"] += 100  # valid JSON, not resealed
    store.put_bytes(layout.receipt("edited", "000002"), json.dumps(receipt).encode())
    ran.clear()
    with caplog.at_level("WARNING", logger="tasks.fanout"):
        again = run_stage(store, stage, inline=True)
    assert ran == [2]  # the edited receipt is redone; the edited row is read from its intact receipt
    assert [c.n for c in again.per_shard(Numbered)] == [0, 1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("summaries/edited.parquet" in w and "000001" in w and "checksum" in w for w in warnings), warnings
    assert any("receipts/edited/000002.json" in w and "checksum" in w for w in warnings), warnings


def test_a_stage_counts_in_its_typed_record_and_reads_it_back_as_one(tmp_path):
    with pytest.raises(ValidationError, match="tokns"):
        TokenizeCounts(documents=1, tokns=2)  # a misspelt count fails here, instead of reading as 0 later
    with pytest.raises(ValidationError):
        ShardResult(counts={"documents": 1, "tokens": 2})  # a name -> int dict is not a stage's record
    with pytest.raises(ValidationError):
        TokenizeCounts(documents=1)  # nor is a record with a count left out

    store = open_store(str(tmp_path))
    buckets = [  # ranges split into verify groups, and ranges that wrote edges (without verification)
        BucketCounts(buckets=0, members=0, verify_groups=3),
        BucketCounts(buckets=1, members=2, verify_groups=0),
        BucketCounts(buckets=2, members=4, edges=2),
        BucketCounts(buckets=3, members=6, edges=3),
    ]
    stage = Stage("near-buckets", list(range(4)), lambda p: f"p{p:04d}", lambda p: ShardResult(counts=buckets[p]), ())
    summary = run_stage(store, stage, inline=True)
    receipt = json.loads(store.get_bytes(layout.receipt("near-buckets", "p0000")))
    assert receipt["counts"] == {"buckets": 0, "members": 0, "verify_groups": 3}  # a count that does not apply is left out
    read = StageSummary.from_parquet("near-buckets", store.get_bytes(layout.summary("near-buckets")))
    assert read.per_shard(BucketCounts) == summary.per_shard(BucketCounts) == buckets
    assert read.totals(BucketCounts) == BucketCounts(buckets=6, members=12, edges=5, verify_groups=3)
    assert read.count_totals() == {"buckets": 6, "edges": 5, "members": 12, "verify_groups": 3}  # the display's
    empty = run_stage(store, Stage("near-none", [], str, lambda _: ShardResult(), ()), inline=True)
    assert empty.totals(BucketCounts) == BucketCounts(buckets=0, members=0)


def test_a_step_result_reads_its_summary_unchecked_only_as_the_bytes_the_step_checked(tmp_path, monkeypatch):
    """A later step reads an earlier step's summary through its StepResult: rows the step checked
    are not checked again while the summary's bytes are the same; a summary edited after the
    step is checked row by row, and a row that fails its checksum fails the read."""
    from tasks.step_result import StageMissing, StepRun
    from tests.builds import tiny_config

    store = open_store(str(tmp_path))
    config = tiny_config(str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "out"))
    run = StepRun("counted", store, config, inline=True)
    run(Stage("counted", list(range(5)), lambda i: f"{i:06d}", lambda i: ShardResult(counts=Numbered(n=i)), ()))
    result = run.result()
    assert result.summary_sha256 == sha256_bytes(store.get_bytes(layout.summary("counted")))
    checks = []
    monkeypatch.setattr(StageSummary, "edited", lambda self: checks.append(self.stage) or [])
    assert result.summary(store).totals(Numbered).n == 10 and checks == []
    monkeypatch.undo()

    table = result.summary(store).table
    n = table.column(COUNT + "n").to_pylist()
    n[3] += 100
    edited = table.set_column(table.column_names.index(COUNT + "n"), COUNT + "n", pa.array(n))
    store.put_bytes(layout.summary("counted"), StageSummary("counted", edited).to_parquet())
    with pytest.raises(StageMissing, match="summaries/counted.parquet"):
        result.summary(store)
