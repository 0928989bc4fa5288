"""Helpers shared by the tests that run whole builds: a small config of the sample corpus, the
objects a build left, and the accounting check every build must pass."""

from __future__ import annotations

from pathlib import Path

import yaml

from storage.manifest import DatasetManifest, read_record
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
    return read_record(*open_object(uri), DatasetManifest)


def assert_reconciles(manifest_uri: str, corpus: dict) -> DatasetManifest:
    manifest = load_manifest(manifest_uri)
    for name, accounting in manifest.sources.items():
        assert accounting.reconciles, (name, accounting)
        assert accounting.docs_in == corpus["sources"][name]["documents"]
    assert sum(a.kept for a in manifest.sources.values()) == manifest.total_documents
    return manifest
