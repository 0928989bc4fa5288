"""The plan: which input files a source's glob names (local folders and S3 keys alike)."""

from __future__ import annotations

import hashlib
import re
import time
import uuid

import pytest
from pydantic import ValidationError

from storage.s3 import s3_client
from storage.store import LocalStore, Store, open_store
from tasks.config import BuildConfig, Filters, SourceConfig
from tasks.ingest import ingest_file
from tasks.plan import InputChanged, PlanError, freeze_plan, list_source, make_plan, read_plan

TREE = [
    "a/one.jsonl",
    "a/two.jsonl",
    "a/.hidden.jsonl",
    "a/notes.txt",
    "a/sub/three.jsonl",
    "a/sub/deeper/four.jsonl",
    "a/.git/five.jsonl",
]


def matched(store: Store, pattern: str) -> list[str]:
    source = SourceConfig(name="web", uri=f"{store.uri}/{pattern}", format="jsonl")
    return [uri.removeprefix(store.uri + "/") for uri, _ in list_source(source)]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a/*.jsonl", ["a/one.jsonl", "a/two.jsonl"]),  # not below a/, not hidden
        ("a/?ne.jsonl", ["a/one.jsonl"]),
        ("a/[!o]*.jsonl", ["a/two.jsonl"]),
        ("a/*/*.jsonl", ["a/sub/three.jsonl"]),
        ("a/**/*.jsonl", ["a/one.jsonl", "a/sub/deeper/four.jsonl", "a/sub/three.jsonl", "a/two.jsonl"]),
        ("a/sub/**", ["a/sub/deeper/four.jsonl", "a/sub/three.jsonl"]),
        ("a/.*.jsonl", ["a/.hidden.jsonl"]),  # hidden files when the pattern names them
        ("a/.git/*.jsonl", ["a/.git/five.jsonl"]),
    ],
)
def test_a_glob_matches_by_posix_rules_on_every_store(store, pattern, expected):
    for key in TREE:
        store.put_bytes(key, b'{"text": "x"}\n')
    assert matched(store, pattern) == expected


# --- the plan pins each input; ingest refuses one that changed ------------------------------

DOC = b'{"text": "a document long enough to be kept"}\n'
FILTERS = Filters(min_chars=10)


def build_config(store: Store, **source_fields) -> BuildConfig:
    source = {"name": "web", "uri": f"{store.uri}/raw/*.jsonl", "format": "jsonl", **source_fields}
    return BuildConfig(name="b", sources=[source])


def rewrite(store: Store, key: str, data: bytes) -> None:
    """Change an input the way a user would: in place for a local file (its inode stays), a PUT on S3."""
    path = store.local_path(key)
    if path is None:
        store.put_bytes(key, data)
        return
    time.sleep(0.05)  # past the file system's timestamp granularity, as any later edit is
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


def test_ingest_refuses_an_input_appended_to_or_edited_at_the_same_size_since_the_plan(store, tmp_path):
    store.put_bytes("raw/appended.jsonl", DOC)
    store.put_bytes("raw/edited.jsonl", DOC)
    config = build_config(store)
    appended, edited = make_plan(config)
    assert appended.identity and edited.identity  # the listing's version is pinned
    rewrite(store, "raw/appended.jsonl", DOC * 2)
    rewrite(store, "raw/edited.jsonl", DOC.replace(b"a document", b"A DOCUMENT"))
    out = LocalStore(tmp_path / "build")

    changed_size = rf"{re.escape(appended.uri)} changed since the plan \(size {len(DOC)} -> {2 * len(DOC)}[,)]"
    with pytest.raises(InputChanged, match=changed_size):
        ingest_file(appended, config.sources[0], FILTERS, quarantine=True, out=out)
    version = "etag" if store.local_path("raw/edited.jsonl") is None else "mtime_ns"
    with pytest.raises(InputChanged, match=rf"{re.escape(edited.uri)} changed since the plan \({version} .*new build"):
        ingest_file(edited, config.sources[0], FILTERS, quarantine=True, out=out)
    assert list(out.list()) == []  # nothing committed for either


def test_a_rerun_names_the_input_that_changed_since_the_frozen_plan(store, tmp_path):
    store.put_bytes("raw/a.jsonl", DOC)
    store.put_bytes("raw/b.jsonl", DOC)
    config, out = build_config(store), LocalStore(tmp_path / "build")
    freeze_plan(config, out)
    assert freeze_plan(config, out) == read_plan(out)  # unchanged inputs resume
    rewrite(store, "raw/b.jsonl", DOC * 3)
    with pytest.raises(PlanError, match=rf"input {re.escape(store.url('raw/b.jsonl'))} changed \(size .*build_id"):
        freeze_plan(config, out)


def test_a_source_pinned_by_content_survives_a_rewrite_of_the_same_bytes_only(store, tmp_path):
    store.put_bytes("raw/a.jsonl", DOC)
    config = build_config(store, pin_content=True)
    (file,) = make_plan(config)
    assert file.identity == {"sha256": hashlib.sha256(DOC).hexdigest()}
    store.put_bytes("raw/a.jsonl", DOC)  # a copy or a touch: same content, new version stamp
    receipt = ingest_file(file, config.sources[0], FILTERS, quarantine=True, out=LocalStore(tmp_path / "ok"))
    assert receipt.counts.kept == 1
    rewrite(store, "raw/a.jsonl", DOC.replace(b"a document", b"A DOCUMENT"))
    out = LocalStore(tmp_path / "refused")
    with pytest.raises(InputChanged, match=rf"{re.escape(file.uri)} changed since the plan \(sha256 "):
        ingest_file(file, config.sources[0], FILTERS, quarantine=True, out=out)
    assert list(out.list()) == []


def test_an_s3_plan_takes_sizes_and_etags_from_the_listing_pages_not_one_head_per_input(s3_bucket_uri):
    store = open_store(f"{s3_bucket_uri}/{uuid.uuid4().hex[:8]}")
    for n in range(5):
        store.put_bytes(f"raw/{n}.jsonl", DOC * (n + 1))
    heads = []
    events = s3_client().meta.events
    events.register("before-call.s3.HeadObject", lambda **call: heads.append(call), unique_id="count-heads")
    try:
        files = make_plan(build_config(store))
        planned_heads = len(heads)
        store.info("raw/0.jsonl")  # what a HEAD per input would have cost
    finally:
        events.unregister("before-call.s3.HeadObject", unique_id="count-heads")
    assert planned_heads == 0 and len(heads) == 1
    expected = [store.info(f"raw/{n}.jsonl") for n in range(5)]
    assert [(f.size, f.identity) for f in files] == [(info.size, info.version) for info in expected]
    assert all(f.identity["etag"] for f in files)


# --- the store's own outputs are never planned as inputs -------------------------------------


def config_of(uri: str, output: str, fmt: str = "jsonl") -> dict:
    return {"name": "b", "output": output, "sources": [{"name": "web", "uri": uri, "format": fmt}]}


def refusal(uri: str, output: str, fmt: str = "jsonl") -> str:
    with pytest.raises(ValidationError) as refused:
        BuildConfig.model_validate(config_of(uri, output, fmt))
    [problem] = refused.value.errors()
    return problem["msg"]


def test_an_input_glob_that_could_match_the_output_store_is_refused_naming_both(store):
    """A previous build's quarantine jsonl lies under <output>/datasets/: any glob that could reach
    it (or a later build's outputs, or a run's) is refused when the config is read."""
    root = store.uri
    store.put_bytes("raw/one.jsonl", DOC)
    store.put_bytes("datasets/b/old/quarantine/web/000000.jsonl", b'{"line": 3, "reason": "invalid JSON"}\n')
    for glob in (
        f"{root}/**/*.jsonl",
        f"{root}/*/*/*/*/web/*.jsonl",
        f"{root}/d*/**",
        f"{root}/[!d]*/*/*",  # runs/<run>/metrics.jsonl
        f"{root}/datasets/b/old/quarantine/web/000000.jsonl",
    ):
        message = refusal(glob, root)
        assert "\n" not in message and f"source 'web': input {glob} could match" in message, message
        assert f"under output {root} ({root}/" in message, message
    assert refusal(f"{root}/datasets/b/old", root, "hf")  # a dataset folder inside a build
    # the same store, with the inputs in a folder of their own: planned, and only they are
    for glob in (f"{root}/raw/**/*.jsonl", f"{root}/*/one.jsonl", f"{root}/*/*.jsonl"):
        config = BuildConfig.model_validate(config_of(glob, root))
        assert [f.uri for f in make_plan(config)] == [store.url("raw/one.jsonl")]


def test_a_config_widened_after_validation_is_refused_at_plan_before_anything_is_written(store):
    store.put_bytes("raw/one.jsonl", DOC)
    config = BuildConfig.model_validate(config_of(f"{store.uri}/raw/*.jsonl", store.uri))
    widened = config.model_copy(update={"sources": [config.sources[0].model_copy(update={"uri": f"{store.uri}/**"})]})
    with pytest.raises(ValueError, match=rf"input {re.escape(store.uri)}/\*\* could match .* under output "):
        freeze_plan(widened, store.child("datasets/b/x"))
    assert list(store.list()) == ["raw/one.jsonl"]


def test_relative_paths_and_symlinks_are_compared_where_they_lead(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw" / "web").mkdir(parents=True)
    (tmp_path / "elsewhere").symlink_to(tmp_path / "raw", target_is_directory=True)
    for glob, output in [
        ("./**/*.jsonl", "out"),
        ("raw/**/*.jsonl", "raw/web/../store"),
        ("raw/**", "elsewhere/store"),
        ("elsewhere/*/*/*/*.jsonl", "raw"),
        (f"{tmp_path}/raw/**", f"file://{tmp_path}/raw/"),
        ("/**/*.jsonl", "out"),
    ]:
        assert f"input {glob} could match" in refusal(glob, output), (glob, output)
    for glob, output in [("raw/*.jsonl", "."), ("raw/**/*.jsonl", "out"), ("raw/web/*.jsonl", "raw"), ("*/*.jsonl", ".")]:
        BuildConfig.model_validate(config_of(glob, output))


def test_a_task_call_walks_the_build_not_its_plan(store, tmp_path):
    """Prefect walks every parameter of a task call (visit_collection: twice a call, for its inputs
    and futures); the Build it walks holds its config only, however many files were planned and
    loaded: at 60,000 files the walk of a cached plan cost ~20 s a build."""
    from prefect.utilities.collections import visit_collection

    from tasks.plan import Build

    for name in ("a", "b", "c"):
        store.put_bytes(f"raw/{name}.jsonl", DOC)
    build = Build(config=build_config(store).model_copy(update={"output": str(tmp_path / "out")}))
    freeze_plan(build.config, build.store)
    assert len(build.plan) == 3 and build.store is build.store  # loaded once, then kept
    visited = []
    visit_collection(build, lambda value: visited.append(value) or value)
    assert not [v for v in visited if isinstance(v, Store) or type(v).__name__ == "PlannedFile"], visited
    assert len(visited) < 100  # the config's values
