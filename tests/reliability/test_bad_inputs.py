"""The whole flow over hostile inputs with quarantine on: every bad record is counted and
quarantined with its reason, every source reconciles, and a zstd bomb that expands to
gigabytes leaves the ingest workers' memory bounded."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.build_dataset import build_dataset
from runtime.processes import process_tree
from storage.store import open_store
from tasks.config import BuildConfig
from tasks.ingest import IngestError
from tests.builds import load_manifest
from tests.reliability.hostile import MAX_RECORD_BYTES, write_hostile_corpus

pytestmark = pytest.mark.usefixtures("prefect_server", "ray_local")
WORKER_RSS_LIMIT = 1536 << 20


def ray_workers_peak_rss() -> int:
    """The largest peak RSS (VmHWM) of this process's live Ray workers, in bytes."""
    peak = 0
    for pid in process_tree(os.getpid()):
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) << 10)
    return peak


def test_hostile_inputs_are_quarantined_counted_and_memory_stays_bounded(tmp_path):
    hostile = write_hostile_corpus(tmp_path / "hostile")
    config = BuildConfig.model_validate({
        "name": "hostile", "output": str(tmp_path / "out"), "sources": hostile["sources"],
        "tokenizer": {"train": {"vocab_size": 300}}, "filters": {"min_chars": 1, "max_record_bytes": MAX_RECORD_BYTES},
        "minhash": {"bucket_partitions": 1, "component_partitions": 1},
    })
    peak, done = [0], threading.Event()

    def sample_memory() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], ray_workers_peak_rss())

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    try:
        manifest = load_manifest(build_dataset(config))
    finally:
        done.set()
        sampler.join()

    for name, accounting in manifest.sources.items():
        assert accounting.reconciles, (name, accounting)
    web = manifest.sources["web"]
    assert {k: getattr(web, k) for k in hostile["web"]} == hostile["web"]
    zst = manifest.sources["zst"]
    assert {k: getattr(zst, k) for k in hostile["zst"]} == hostile["zst"]  # the bomb's record, the cut frame

    store = open_store(config.output).child(f"datasets/hostile/{config.resolved_build_id}")
    reasons = [json.loads(line)["reason"] for key in store.list("quarantine/") for line in store.get_text(key).splitlines()]
    assert len(reasons) == web.malformed + zst.malformed
    for expected in ("invalid JSON", "UTF-8", "surrogate", "exceeds max_record_bytes", "truncated"):
        assert any(expected.lower() in r.lower() for r in reasons), (expected, reasons)
    assert sum("exceeds max_record_bytes" in r for r in reasons) == 3  # 6 MB line, 50 MB document, bomb
    # every ingest worker stayed far below what the bomb decompresses to
    assert 0 < peak[0] < WORKER_RSS_LIMIT < hostile["bomb_bytes"], peak[0]


def test_a_parquet_file_without_the_text_column_fails_naming_the_file(tmp_path):
    bad = tmp_path / "code" / "no-text.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"content_typo": ["x" * 300]}), bad)
    config = BuildConfig.model_validate({
        "name": "nocolumn", "output": str(tmp_path / "out"),
        "sources": [{"name": "code", "uri": str(bad), "format": "parquet", "text_field": "content"}],
        "tokenizer": {"train": {"vocab_size": 300}},
    })
    with pytest.raises(IngestError, match=r"no-text\.parquet.*content|content.*no-text\.parquet"):
        build_dataset(config)
    assert not any(k.endswith("manifest.json") for k in open_store(config.output).list())
