"""Shared by the reliability tests: one small sample corpus and its undisturbed reference build.

Every fault test rebuilds the same config somewhere else and compares against `reference`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.build_dataset import build_dataset
from storage.manifest import DatasetManifest, read_record
from storage.store import open_object, open_store
from tasks.config import BuildConfig
from tasks.sample_corpus import make_sample_corpus

CORPUS_BYTES = 256 << 10


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    return make_sample_corpus(tmp_path_factory.mktemp("reliability-raw"), target_bytes=CORPUS_BYTES, seed=11)


def sample_config(corpus: dict, output: str, **updates) -> BuildConfig:
    config = yaml.safe_load(Path(corpus["config"]).read_text())
    config.update(name="reliable", output=output, tokenizer={"train": {"vocab_size": 512}})
    config["minhash"].update(bucket_partitions=2, component_partitions=2)
    config.update(updates)
    return BuildConfig.model_validate(config)


def build_outputs(output: str) -> dict[str, bytes]:
    """Every object of every build under `output`, receipts aside (they record timings)."""
    store = open_store(output)
    return {key: store.get_bytes(key) for key in store.list("datasets/") if "/receipts/" not in key}


def assert_reconciles(manifest_uri: str, corpus: dict) -> DatasetManifest:
    manifest = read_record(*open_object(manifest_uri), DatasetManifest)
    for name, accounting in manifest.sources.items():
        assert accounting.reconciles, (name, accounting)
        assert accounting.docs_in == corpus["sources"][name]["documents"]
    assert sum(a.kept for a in manifest.sources.values()) == manifest.total_documents
    return manifest


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory, prefect_server, ray_local) -> dict[str, bytes]:
    """The undisturbed in-process build's objects; a correct build anywhere reproduces them."""
    config = sample_config(corpus, str(tmp_path_factory.mktemp("reference")))
    assert_reconciles(build_dataset(config), corpus)
    outputs = build_outputs(config.output)
    assert any(k.endswith(".bin") for k in outputs) and any(k.endswith("manifest.json") for k in outputs)
    return outputs
