"""Shared by the reliability tests: one small sample corpus and its undisturbed reference build.

Every fault test rebuilds the same config somewhere else and compares against `reference`.
"""

from __future__ import annotations

import pytest

from demo.sample_corpus import make_sample_corpus
from flows.build_dataset import build_dataset
from tests.builds import assert_reconciles, build_objects, sample_config

CORPUS_BYTES = 256 << 10


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    return make_sample_corpus(tmp_path_factory.mktemp("reliability-raw"), target_bytes=CORPUS_BYTES, seed=11)


@pytest.fixture(scope="session")
def reference(corpus, tmp_path_factory, prefect_server, ray_local) -> dict[str, bytes]:
    """The undisturbed in-process build's objects; a correct build anywhere reproduces them."""
    config = sample_config(corpus, str(tmp_path_factory.mktemp("reference")))
    assert_reconciles(build_dataset(config), corpus)
    outputs = build_objects(config.output, receipts=False)
    assert any(k.endswith(".bin") for k in outputs) and any(k.endswith("manifest.json") for k in outputs)
    return outputs
