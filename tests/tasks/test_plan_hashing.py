"""A source that pins content is hashed in Ray tasks: the plan's driver reads no input bytes,
only listings, and collects the digests; a rerun still names an input whose content changed."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest

from storage.store import ObjectNotFound, open_store
from tasks import plan
from tasks.config import BuildConfig
from tasks.plan import PlanError, freeze_plan, make_plan
from tests.builds import RequestCounter

pytestmark = pytest.mark.usefixtures("ray_local")

DOC = b'{"text": "a document long enough to be kept"}\n'


def pinned_config(store) -> BuildConfig:
    return BuildConfig(name="b", sources=[{"name": "web", "uri": f"{store.uri}/raw/*.jsonl", "format": "jsonl", "pin_content": True}])


def test_pinned_inputs_are_hashed_in_ray_tasks_and_the_driver_reads_none_of_their_bytes(s3_bucket_uri, monkeypatch):
    store = open_store(f"{s3_bucket_uri}/{uuid.uuid4().hex[:8]}")
    contents = [DOC * (n + 1) for n in range(7)]
    for n, data in enumerate(contents):
        store.put_bytes(f"raw/{n}.jsonl", data)
    monkeypatch.setattr(plan, "HASH_TASK_BYTES", 3 * len(DOC))  # several hashing tasks, digests kept in order
    driver = RequestCounter()
    driver.take()
    files = make_plan(pinned_config(store))
    calls = driver.take()
    assert calls["GetObject"] == 0 and calls["HeadObject"] == 0 and calls["ListObjectsV2"] >= 1, calls
    assert [f.identity for f in files] == [{"sha256": hashlib.sha256(data).hexdigest()} for data in contents]


def test_a_rerun_accepts_a_pinned_input_rewritten_with_the_same_bytes_and_names_one_changed(store, tmp_path):
    store.put_bytes("raw/a.jsonl", DOC)
    store.put_bytes("raw/b.jsonl", DOC)
    config, out = pinned_config(store), open_store(str(tmp_path / "build"))
    frozen = freeze_plan(config, out)
    store.put_bytes("raw/b.jsonl", DOC)  # a copy or a touch: same content, new version stamp
    assert freeze_plan(config, out) == frozen
    store.put_bytes("raw/b.jsonl", DOC.replace(b"a document", b"A DOCUMENT"))
    with pytest.raises(PlanError, match=rf"input {re.escape(store.url('raw/b.jsonl'))} changed \(identity .*build_id"):
        freeze_plan(config, out)


def test_an_input_gone_before_it_was_hashed_is_named(store):
    store.put_bytes("raw/a.jsonl", DOC)
    listed = plan.list_source(pinned_config(store).sources[0])
    store.delete("raw/a.jsonl")
    with pytest.raises(ObjectNotFound, match=re.escape(store.url("raw/a.jsonl"))):
        plan.hash_inputs(listed)
