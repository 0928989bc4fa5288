"""A build asks the store for no object's version: a write's own answer gives the version its
receipt records, and ingest checks each input against the plan on the answer of the read that
ingests it. The S3 requests of the driver and of every Ray task (botocore's hooks on each
process's client) are counted; a rerun finds every receipt intact against the listings."""

from __future__ import annotations

import functools
import re
import uuid
from collections import Counter

import pytest
import ray

from flows.build_dataset import build_dataset
from storage.manifest import ObjectInfo, ShardResult, sha256_bytes
from storage.store import StoreError, open_store
from tasks import fanout
from tasks.fanout import _work_and_commit as work_and_commit
from tasks.fanout import commit
from tasks.stage import INGEST, TOKENIZE, TOKENIZER, TOKENIZER_SAMPLE
from tests.builds import RequestCounter, tiny_config, tiny_corpus

INPUT_FILES = 24
TALLY = "s3-requests-of-ray-tasks"


@ray.remote(num_cpus=0)
class Tally:
    """The S3 requests of every Ray task of the stages, by stage and operation."""

    def __init__(self):
        self.requests: dict[str, Counter[str]] = {}

    def add(self, stage: str, requests: Counter[str]) -> None:
        self.requests.setdefault(stage, Counter()).update(requests)

    def take(self) -> dict[str, Counter[str]]:
        taken, self.requests = self.requests, {}
        return taken


@pytest.fixture
def tally(ray_local):
    actor = Tally.options(name=TALLY).remote()
    yield actor
    ray.kill(actor)


@functools.cache
def process_requests() -> RequestCounter:
    """This worker process's counter: one hook on its client, however many tasks it runs."""
    return RequestCounter()


def counted_work_and_commit(store, stage_name: str, prefixes: tuple[str, ...], work, shard: str, item):
    """tasks.fanout's Ray task (the work, then its commit), its S3 requests added to the tally."""
    requests = process_requests()
    requests.take()
    try:
        return work_and_commit(store, stage_name, prefixes, work, shard, item)
    finally:
        ray.get(ray.get_actor(TALLY).add.remote(stage_name, requests.take()))


@pytest.mark.usefixtures("prefect_server")
def test_a_build_on_s3_makes_no_head_request_and_its_rerun_finds_every_receipt_intact(tmp_path, s3_bucket_uri, tally, monkeypatch):
    root = f"{s3_bucket_uri}/no-heads-{uuid.uuid4().hex[:8]}"
    inputs = open_store(f"{root}/raw")
    for path in sorted(tiny_corpus(tmp_path / "raw", INPUT_FILES, 4, seed=5).iterdir()):
        inputs.put_file(path.name, path)
    config = tiny_config(f"{root}/raw/*.jsonl", f"{root}/out")
    # imported by its module's name, so that Ray ships a reference and each worker counts its own calls
    monkeypatch.setattr(fanout, "_work_and_commit", counted_work_and_commit)
    driver = RequestCounter()
    driver.take()

    build_dataset(config)
    tasks, driven = ray.get(tally.take.remote()), driver.take()
    assert tasks[INGEST]["GetObject"] == INPUT_FILES, tasks  # every input read once, by a counted task
    assert {TOKENIZER_SAMPLE, TOKENIZER, TOKENIZE} <= set(tasks), tasks
    # none in any stage: no object written here is larger than the multipart threshold (64 MiB),
    # the one write that asks its version with a HEAD
    heads = {stage: requests["HeadObject"] for stage, requests in tasks.items() if requests["HeadObject"]}
    assert heads == {} and driven["HeadObject"] == 0, (heads, driven)

    build_dataset(config)
    # no shard is redone: each output is listed at the version its receipt took from the write
    assert ray.get(tally.take.remote()) == {}
    assert set(driver.take()) <= {"ListObjectsV2", "GetObject"}


def test_commit_records_the_version_its_write_answered_and_refuses_another_size(s3_bucket_uri):
    store = open_store(f"{s3_bucket_uri}/commit-{uuid.uuid4().hex[:8]}")
    data = b"12345"
    stored = store.put_bytes("out/a.bin", data)

    def output(size: int, with_answer: bool = True) -> ShardResult:
        info = ObjectInfo(key="out/a.bin", size=size, sha256=sha256_bytes(data), stored=stored if with_answer else None)
        return ShardResult(outputs=[info])

    requests = RequestCounter()
    receipt = commit(store, "s", ("out/",), "0", output(len(data)), 0.0)
    assert requests.take() == {"PutObject": 1}  # the receipt's: no HEAD
    assert receipt.versions == {"out/a.bin": stored.version} == {"out/a.bin": store.info("out/a.bin").version}
    requests.take()
    with pytest.raises(StoreError, match=rf"^{re.escape(store.url('out/a.bin'))} holds 5 bytes after 6 were written$"):
        commit(store, "s", ("out/",), "1", output(6), 0.0)
    # an output its writer did not describe with the store's answer is asked for it: one HEAD
    assert commit(store, "s", ("out/",), "2", output(len(data), with_answer=False), 0.0).versions == receipt.versions
    assert requests.take()["HeadObject"] == 1
