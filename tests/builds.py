"""Helpers shared by the tests (and benchmarks/scale.py) that run whole builds: a small config
of the sample corpus, a corpus of many tiny files, the objects a build left, the accounting
check every build must pass, and a count of the driver's S3 calls."""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from pathlib import Path

import yaml

from storage.manifest import DatasetManifest, ShardTable, read_manifest, read_shard_table
from storage.store import open_object, open_store
from tasks.config import BuildConfig


def sample_config(corpus: dict, output: str, **updates) -> BuildConfig:
    """The corpus's own sample.yaml, made fast: a small vocabulary and few MinHash partitions."""
    config = yaml.safe_load(Path(corpus["config"]).read_text())
    config.update(output=output, tokenizer={"train": {"vocab_size": 1024}})
    config["minhash"].update(bucket_partitions=2, component_partitions=2)
    config.update(updates)
    return BuildConfig.model_validate(config)


RECORDS = ("/receipts/", "/summaries/")  # they record timings and object versions


def build_objects(output: str, receipts: bool = True) -> dict[str, bytes]:
    """Every object of every build under `output` (leave receipts and summaries out to compare runs)."""
    store = open_store(output)
    return {key: store.get_bytes(key) for key in store.list("datasets/") if receipts or not any(r in key for r in RECORDS)}


def load_manifest(uri: str) -> DatasetManifest:
    return read_manifest(*open_object(uri))


def load_shards(uri: str) -> ShardTable:
    store, key = open_object(uri)
    return read_shard_table(store, key, read_manifest(store, key))


def assert_reconciles(manifest_uri: str, corpus: dict) -> DatasetManifest:
    manifest = load_manifest(manifest_uri)
    for name, accounting in manifest.sources.items():
        assert accounting.reconciles, (name, accounting)
        assert accounting.docs_in == corpus["sources"][name]["documents"]
    assert sum(a.kept for a in manifest.sources.values()) == manifest.total_documents
    return manifest


def tiny_corpus(folder: Path, files: int, docs_per_file: int, seed: int) -> Path:
    """`files` jsonl files of `docs_per_file` random 60-word documents each."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(2000)]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        lines = [json.dumps({"text": " ".join(rng.choices(vocabulary, k=60))}) for _ in range(docs_per_file)]
        (folder / f"part-{index:05d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def tiny_config(inputs: str, output: str, **updates) -> BuildConfig:
    """A build of the jsonl files matching `inputs` (a glob, local or s3://) with a small vocabulary."""
    return BuildConfig.model_validate(
        {
            "name": "tiny",
            "output": output,
            "sources": [{"name": "web", "uri": inputs, "format": "jsonl"}],
            "tokenizer": {"train": {"vocab_size": 512}},
            "filters": {"min_chars": 10},
            **updates,
        }
    )


class RequestCounter:
    """Every S3 call this process's client makes, by operation (botocore's event hooks); Ray
    workers are other processes with their own clients, so this counts the driver only."""

    def __init__(self):
        from storage.s3 import s3_client

        self.operations: Counter[str] = Counter()
        s3_client().meta.events.register("before-call.s3", self)

    def __call__(self, model, **_):
        self.operations[model.name] += 1

    def take(self) -> Counter[str]:
        taken, self.operations = self.operations, Counter()
        return taken
