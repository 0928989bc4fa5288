"""One document convention per run: recorded in the manifest, checked by the loader."""

from __future__ import annotations

import json

import pytest

from model.data import BlockLoader, DataError, DataSource, load_manifests
from storage.manifest import DocumentConvention, TokenizerInfo
from storage.store import open_object
from tests.model.synthetic import write_synthetic_build


def with_bos(manifest_uri: str) -> None:
    """Record the BOS convention in a synthetic build's manifest (its documents are EOS-only)."""
    store, key = open_object(manifest_uri)
    manifest = json.loads(store.get_bytes(key))
    manifest["documents"] = {"bos": True, "eos": True}
    store.put_bytes(key, json.dumps(manifest).encode())


def test_frame_puts_bos_first_and_eos_last():
    info = TokenizerInfo(key="k", sha256="s", vocab_size=10, bos_id=1, eos_id=2, trained=False)
    assert DocumentConvention().frame([5, 6], info) == [1, 5, 6, 2]
    assert DocumentConvention(bos=False).frame([5, 6], info) == [5, 6, 2]


def test_a_manifest_without_a_convention_reads_as_eos_only(tmp_path):
    uri = write_synthetic_build(str(tmp_path), "old", {"web": [8] * 20}, vocab_size=64, seed=0, shard_tokens=256)
    store, key = open_object(uri)
    manifest = json.loads(store.get_bytes(key))
    del manifest["documents"]  # as written before the convention was recorded
    store.put_bytes(key, json.dumps(manifest).encode())
    (manifest,), _ = load_manifests([DataSource(manifest=uri)])
    assert manifest.documents == DocumentConvention(bos=False, eos=True)


def test_mixing_conventions_in_one_run_is_refused(tmp_path):
    store = str(tmp_path / "store")
    a = write_synthetic_build(store, "a", {"web": [8] * 40}, vocab_size=64, seed=0, shard_tokens=256)
    b = write_synthetic_build(store, "b", {"web": [8] * 40}, vocab_size=64, seed=1, shard_tokens=256)
    with_bos(b)
    sources = [DataSource(manifest=a), DataSource(manifest=b)]
    with pytest.raises(DataError, match="frame documents differently") as refused:
        load_manifests(sources)
    assert a in str(refused.value) and b in str(refused.value) and "'bos': True" in str(refused.value)
    with pytest.raises(DataError, match="frame documents differently"):
        BlockLoader(sources, 8, 0, cache_dir=tmp_path / "cache")
