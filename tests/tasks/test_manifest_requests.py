"""The manifest step (tasks/publish.py::write_manifest) builds the shard table from the tokenize
summary's columns and the accounting from the steps' results: it reads and lists nothing under
tokens/ (the tokenize step committed or listed every token file in the same run), its requests
do not grow with the token files, and the driver's memory grows by far less than a receipt
object's worth per tokenize receipt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from storage import build_layout as layout
from storage.manifest import ObjectInfo, ShardResult, ShardTable, SourceAccounting, TokenizerInfo, TokenShard, sha256_bytes
from tasks.fanout import read_summary
from tasks.plan import Build
from tasks.publish import write_manifest
from tasks.stage import INGEST, TOKENIZE, Stage
from tasks.step_result import StepResult, StepRun
from tasks.stage_counts import TokenizeCounts
from tests.builds import load_shards, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = TokenizerInfo(key=layout.TOKENIZER_MODEL, sha256="1" * 64, vocab_size=512, bos_id=1, eos_id=2, trained=False)


def _shard_name(item: int) -> str:
    return f"{item:06d}"


def _ingested(documents: int) -> ShardResult:
    return ShardResult(sources={"web": SourceAccounting(docs_in=documents, kept=documents)})


def _tokenized(store, item: int, parts: int) -> ShardResult:
    """What tokenize_shard returns for `parts` token shards of one document each (the bytes are
    tiny and distinct: the manifest step does not parse them)."""
    shards = []
    for part in range(parts):
        prefix = layout.tokens("web", _shard_name(item), part)
        infos = []
        for ext in ("bin", "idx"):
            body = f"{prefix}.{ext}".encode()
            store.put_bytes(f"{prefix}.{ext}", body)
            infos.append(ObjectInfo(key=f"{prefix}.{ext}", size=len(body), sha256=sha256_bytes(body)))
        shards.append(TokenShard(prefix=prefix, source="web", documents=1, tokens=item + part + 1, bin=infos[0], idx=infos[1]))
    tokens = sum(s.tokens for s in shards)
    return ShardResult(
        outputs=[info for s in shards for info in (s.bin, s.idx)],
        counts=TokenizeCounts(documents=parts, tokens=tokens),
        sources={"web": SourceAccounting(kept=parts, tokens=tokens)},
        token_shards=shards,
    )


def build_at(output: str) -> Build:
    return Build(config=tiny_config(f"{output}-inputs/*.jsonl", output, dedup={"exact": False, "near": False}))


def tokenized_build(output: str, receipts: int, parts: int) -> tuple[Build, StepResult, StepResult]:
    """A build whose ingest and tokenize steps completed (inline, without dedup): `receipts`
    tokenize receipts of `parts` token shards each, the files on the store; with the two steps' results."""
    build = build_at(output)
    store, items = build.store, list(range(receipts))
    ingest, tokenize = StepRun(INGEST, store, build.config, inline=True), StepRun(TOKENIZE, store, build.config, inline=True)
    ingest(Stage(INGEST, items, _shard_name, lambda i: _ingested(parts), ()))
    tokenize(Stage(TOKENIZE, items, _shard_name, lambda i: _tokenized(store, i, parts), (layout.TOKENS,)))
    return build, ingest.result(), tokenize.result()


class KeyedRequests:
    """Every S3 call of this process's client, as (operation, key or prefix); the manifest step
    makes all of its requests here (nothing of it runs in a Ray task)."""

    def __init__(self):
        from storage.s3 import s3_client

        self.calls: list[tuple[str, str]] = []
        s3_client().meta.events.register("before-parameter-build.s3", self)

    def __call__(self, model, params, **_):
        self.calls.append((model.name, params.get("Key", params.get("Prefix", ""))))


RECEIPTS, PARTS = 260, 2  # 1,040 token files: two pages of a listing


def test_the_manifest_step_reads_and_lists_no_token_file(s3_bucket_uri, prefect_server):
    build, ingested, tokenized = tokenized_build(f"{s3_bucket_uri}/manifest-requests", RECEIPTS, PARTS)
    calls = KeyedRequests()
    write_manifest.fn(build, TOKENIZER, [ingested], tokenized)
    assert not [key for _, key in calls.calls if f"/{layout.TOKENS}" in key], calls.calls
    # the tokenize summary and the old header read, the table and the header written: whatever the token files
    assert Counter(operation for operation, _ in calls.calls) == {"GetObject": 2, "PutObject": 2}, calls.calls
    writes = sorted(key.rsplit("/", 1)[-1] for operation, key in calls.calls if operation == "PutObject")
    assert writes == [layout.MANIFEST, layout.SHARD_TABLE]  # no receipt, no summary of a verify stage
    shards = load_shards(build.store.url(layout.MANIFEST))
    assert len(shards) == RECEIPTS * PARTS and shards.prefixes[:3] == [layout.tokens("web", "000000", p) for p in (0, 1)] + [
        layout.tokens("web", "000001", 0)
    ]
    # made from the summary's columns, the table is the one the receipts' shards give, byte for byte
    receipts = read_summary(build.store, TOKENIZE).receipts
    assert shards.to_parquet() == ShardTable.of([shard for receipt in receipts for shard in receipt.token_shards]).to_parquet()


def step_results(build: Build) -> tuple[list[StepResult], StepResult]:
    """The ingest and tokenize steps' results of a tokenized_build, from their summaries."""
    results = []
    for stage in (INGEST, TOKENIZE):
        summary = read_summary(build.store, stage)
        results.append(StepResult(step=stage, stages=1, shards=len(summary), work_seconds=summary.work_seconds,
                                  bytes_out=summary.bytes_out, sources=summary.sources()))
    return [results[0]], results[1]


# The manifest step in a fresh process, on a small build first (imports, caches, the Prefect
# client), then measured on the given one: Python's peak (tracemalloc) and Arrow's (its pool's).
MEASURE = """
import json, sys, tracemalloc
import pyarrow as pa
from tasks.publish import write_manifest
from tests.tasks.test_manifest_requests import TOKENIZER, build_at, step_results

write_manifest.fn(build_at(sys.argv[1]), TOKENIZER, *step_results(build_at(sys.argv[1])))
measured = build_at(sys.argv[2])
steps = step_results(measured)
tracemalloc.start()
write_manifest.fn(measured, TOKENIZER, *steps)
print(json.dumps({"python": tracemalloc.get_traced_memory()[1], "arrow": pa.default_memory_pool().max_memory()}))
"""
BYTES_PER_RECEIPT = 20 << 10  # measured ~13 KB (4 token shards, 8 files); ~30 KB with a receipt object and TokenShards each


def manifest_bytes(folder: Path, receipts: int, api_url: str) -> dict[str, int]:
    """The manifest step's driver memory over `receipts` tokenize receipts of 4 token shards each
    (as at full scale: 240,000 shards of 60,000 input files)."""
    warm, measured = str(folder / "warm"), str(folder / "measured")
    tokenized_build(warm, 20, 4)
    tokenized_build(measured, receipts, 4)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, warm, measured], cwd=ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "PREFECT_API_URL": api_url},
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_driver_memory_of_the_manifest_step_grows_by_little_per_tokenize_receipt(tmp_path, prefect_server):
    small, large = manifest_bytes(tmp_path / "small", 500, prefect_server), manifest_bytes(tmp_path / "large", 5000, prefect_server)
    growth = large["python"] - small["python"] + large["arrow"] - small["arrow"]
    assert growth < 4500 * BYTES_PER_RECEIPT, (small, large)
