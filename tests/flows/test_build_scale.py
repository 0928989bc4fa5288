"""The build's costs grow with the data, not with data x files: the driver's store requests
stay bounded by the page, and dedup partitions are sized from the documents."""

from __future__ import annotations

import pytest

from flows.build_dataset import build_dataset
from storage import build_layout as layout
from storage.store import open_store
from tasks.exact_dedup import HASH_SCHEMA, exact_dedup
from tasks.ingest import ingest
from tasks.parquet_io import read_partition_of_each
from tasks.partitioning import EXACT_ROW_BYTES, partitions
from tasks.plan import plan
from tests.builds import RequestCounter, tiny_config, tiny_corpus

pytestmark = pytest.mark.usefixtures("prefect_server", "ray_local")

INPUT_FILES = 200
# Per stage the driver lists its receipts and outputs, reads and writes its summary: a few
# calls for each of the ~22 stages and steps (rerun: 3 each, 85 measured, inputs local). One
# call per input file in any stage would alone pass INPUT_FILES.
FIRST_BUILD_REQUESTS = 100
RERUN_REQUESTS = 90


def test_driver_requests_do_not_grow_with_the_input_files(tmp_path, s3_endpoint, s3_bucket_uri):
    corpus = tiny_corpus(tmp_path / "raw", INPUT_FILES, 3, seed=1)
    config = tiny_config(f"{corpus}/*.jsonl", f"{s3_bucket_uri}/requests")
    counter = RequestCounter()
    build_dataset(config)
    first = counter.take()
    build_dataset(config)
    rerun = counter.take()
    assert sum(first.values()) <= FIRST_BUILD_REQUESTS, first
    assert sum(rerun.values()) <= RERUN_REQUESTS, rerun
    # a rerun of a finished build reads listings and summaries, and writes nothing
    assert set(rerun) <= {"ListObjectsV2", "GetObject"}, rerun


def test_exact_dedup_partitions_grow_with_the_documents_and_fit_the_budget(tmp_path):
    budget = 1 << 16
    ranges = {}
    for docs_per_file in (60, 240):
        corpus = tiny_corpus(tmp_path / f"raw-{docs_per_file}", 10, docs_per_file, seed=docs_per_file)
        config = tiny_config(f"{corpus}/*.jsonl", str(tmp_path / f"out-{docs_per_file}"), task_memory_bytes=budget)
        build = plan.fn(config)
        exact_dedup.fn(build, ingest.fn(build))
        store = open_store(config.output).child(build.key)
        documents = 10 * docs_per_file
        ranges[docs_per_file] = partitions(documents, EXACT_ROW_BYTES, budget)
        assert ranges[docs_per_file] == len(list(store.list(layout.receipts("exact-dedup"))))
        batches = list(store.list(layout.EXACT_HASHES))  # one object per batch, a partition per range
        rows = [sum(t.num_rows for t in read_partition_of_each(store, batches, r, HASH_SCHEMA)) for r in range(ranges[docs_per_file])]
        assert sum(rows) == documents
        assert max(rows) * EXACT_ROW_BYTES <= budget, rows  # what one range task holds
    assert ranges[240] > ranges[60] > 1
