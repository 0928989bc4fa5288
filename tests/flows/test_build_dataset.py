"""The build-dataset flow end to end: real Prefect server, real Ray, local folder and S3."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import yaml
from prefect.artifacts import Artifact

from demo.sample_corpus import make_sample_corpus
from flows.build_dataset import build_dataset
from storage.build_layout import SHARD_TABLE, exact_merged
from storage.manifest import DatasetManifest
from storage.shards import IndexedShard
from storage.stage_summary import StageSummary
from storage.store import open_object, open_store
from tasks.config import BuildConfig
from tasks.ingest import IngestError
from tasks.plan import PlanError, ordinal_of, read_plan
from tasks.removals import deduplicated_ids, removed_pairs
from tasks.reporting import build_artifact_key
from tests.builds import assert_reconciles, build_objects, load_manifest, load_shards, sample_config

pytestmark = pytest.mark.usefixtures("prefect_server", "ray_local")

CORPUS_BYTES = 384 << 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return make_sample_corpus(tmp_path_factory.mktemp("raw"), target_bytes=CORPUS_BYTES, seed=7)


@pytest.fixture(scope="module", params=["local", "s3"])
def built(request, corpus, tmp_path_factory) -> tuple[BuildConfig, str]:
    if request.param == "local":
        output = str(tmp_path_factory.mktemp("out"))
    else:
        output = f"{request.getfixturevalue('s3_bucket_uri')}/build-test"
    config = sample_config(corpus, output)
    return config, build_dataset(config)


def decoded_documents(manifest_uri: str, manifest: DatasetManifest, tmp: Path) -> list[str]:
    store, _ = open_object(manifest_uri)
    processor = spm.SentencePieceProcessor(model_proto=store.get_bytes(manifest.tokenizer.key))
    texts = []
    table = load_shards(manifest_uri)
    for shard in map(table.shard, range(len(table))):
        for ext in ("bin", "idx"):
            store.download(f"{shard.prefix}.{ext}", tmp / f"{shard.prefix}.{ext}")
        tokens = IndexedShard(tmp / shard.prefix)
        assert len(tokens) == shard.documents and tokens.num_tokens == shard.tokens
        for i in range(len(tokens)):
            document = tokens.document(i).tolist()
            # the default convention: BOS + text + EOS, and no BOS inside a document
            assert manifest.documents.bos and manifest.documents.eos
            assert document[0] == manifest.tokenizer.bos_id and document[-1] == manifest.tokenizer.eos_id
            assert manifest.tokenizer.bos_id not in document[1:]
            texts.append(processor.decode(document[1:-1]))
    return texts


def test_manifest_reconciles_and_shards_decode_to_the_kept_documents(built, corpus, tmp_path):
    config, manifest_uri = built
    manifest = assert_reconciles(manifest_uri, corpus)
    assert manifest_uri.endswith(f"datasets/sample/{config.resolved_build_id}/manifest.json")
    assert manifest.sources["slimpajama"].filtered >= corpus["sources"]["slimpajama"]["excluded"] > 0

    # the kept documents are the ingested ones minus what dedup removed
    store, _ = open_object(manifest_uri)
    kept = collections.Counter()
    removed = {int(i) for file in read_plan(store) for i in deduplicated_ids(store, file)}
    for key in store.list("docs/"):
        table = pq.read_table(store.download(key, tmp_path / "d" / key), columns=["id", "text"])
        for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            if doc_id not in removed:
                kept[text] += 1
    assert collections.Counter(decoded_documents(manifest_uri, manifest, tmp_path / "tokens")) == kept


def test_exact_dedup_removes_exactly_the_planted_duplicates(built, corpus, tmp_path):
    config, manifest_uri = built
    store, _ = open_object(manifest_uri)
    root = corpus["root"]
    removed = set()
    for file in read_plan(store):
        for doc_id in removed_pairs(store, exact_merged, file)[0].tolist():
            assert ordinal_of(doc_id) == file.ordinal
            removed.add((os.path.relpath(file.uri.removeprefix("file://"), root), doc_id & 0xFFFFFFFF))
    planted = {(d["file"], d["record"]) for d in corpus["duplicates"]}
    excluded = {(d["file"], d["record"]) for d in corpus["duplicates"] if d.get("excluded")}
    assert removed == planted - excluded
    manifest = load_manifest(manifest_uri)
    assert sum(a.exact_dup for a in manifest.sources.values()) == len(removed)


def test_shards_load_in_megatron_core(built, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, manifest_uri = built
    store, _ = open_object(manifest_uri)
    shard = load_shards(manifest_uri).shard(0)
    for ext in ("bin", "idx"):
        store.download(f"{shard.prefix}.{ext}", tmp_path / f"s.{ext}")
    dataset = IndexedDataset(str(tmp_path / "s"))
    assert len(dataset) == shard.documents
    assert int(dataset.sequence_lengths.sum()) == shard.tokens


def test_the_build_run_shows_a_progress_bar_per_step_and_one_summary(built):
    """The Artifacts tab of a build run: one progress artifact per pipeline step that runs stages
    (however many; the manifest step runs none: it writes two objects) and the summary, every one in the run and keyed by the build; the
    summary lists the steps in pipeline order with their counts, and the manifest's accounting."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    config, manifest_uri = built
    key = build_artifact_key(config, "summary")
    assert key == f"build-sample-{config.resolved_build_id}-summary"
    summary = Artifact.get(key)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[summary.flow_run_id]))
        )
    steps = ["ingest", "exact-dedup", "near-dedup", "tokenizer", "tokenize"]
    assert sorted(a.key for a in artifacts) == sorted([key, *(build_artifact_key(config, s, "progress") for s in steps)])
    assert all(a.data == 100.0 for a in artifacts if a.type == "progress")
    markdown = summary.data
    manifest = load_manifest(manifest_uri)
    assert markdown.startswith(f"# Build `sample/{config.resolved_build_id}`") and f"Manifest: `{manifest_uri}`" in markdown
    rows = [markdown.index(f"| {step} |") for step in ["plan", *steps, "manifest"]]
    assert rows == sorted(rows)  # pipeline order
    tokenize_row = markdown[rows[-2] :].splitlines()[0]
    assert f"| {manifest.total_documents:,} |" in tokenize_row  # documents out of the last step that drops any
    ingest_row = markdown[rows[1] :].splitlines()[0].split("|")
    assert float(ingest_row[7]) > 0  # wall seconds, as Prefect timed the task
    for name, a in manifest.sources.items():  # the Sources table is the manifest's accounting
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        counts = [cell.strip() for cell in row.strip("| ").split("|")][3:]
        assert counts == [f"{n:,}" for n in (a.docs_in, a.kept, a.filtered, a.exact_dup, a.near_dup, a.malformed, a.tokens)]


def test_rerun_of_a_finished_build_changes_nothing(built):
    config, manifest_uri = built
    before = build_objects(config.output)
    started = time.perf_counter()
    assert build_dataset(config, train_run="sample-run") == manifest_uri
    assert time.perf_counter() - started < 30
    assert build_objects(config.output) == before
    assert "trains run `sample-run` on it" in Artifact.get(build_artifact_key(config, "summary")).data  # a summary per run, naming its training


def flip_one_byte(store, key: str) -> bytes:
    """Rewrite an object with one byte changed (same size); returns the original bytes."""
    original = store.get_bytes(key)
    middle = len(original) // 2
    store.put_bytes(key, original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1 :])
    return original


def test_damaged_records_and_changed_outputs_are_redone(built, caplog):
    """A truncated receipt or stage summary counts as missing (logged once with its key); a token
    .bin or docs parquet rewritten at the same size after its receipt is caught by the rerun's
    listing (ETag / mtime) and redone, so the rerun restores every object."""
    config, manifest_uri = built
    store = open_store(config.output).child(f"datasets/sample/{config.resolved_build_id}")
    before = build_objects(config.output, receipts=False)
    token_bin = load_shards(manifest_uri).shard(0).bin.key
    docs = next(iter(store.list("docs/")))
    receipt = "receipts/tokenize/000001.json"
    originals = {key: flip_one_byte(store, key) for key in (token_bin, docs)}
    store.put_bytes(receipt, store.get_bytes(receipt)[:40])
    store.put_bytes("summaries/ingest.parquet", b"{")
    with caplog.at_level("WARNING", logger="tasks.fanout"):
        assert build_dataset(config) == manifest_uri
    assert build_objects(config.output, receipts=False) == before
    assert all(store.get_bytes(key) == body for key, body in originals.items())
    warnings = [r.getMessage() for r in caplog.records if r.name == "tasks.fanout"]
    assert sum(receipt in w for w in warnings) == 1 and sum("summaries/ingest.parquet" in w for w in warnings) == 1
    assert any(token_bin in w for w in warnings) and any(docs in w for w in warnings)
    # the rerun wrote valid records again: a further rerun finds them intact and logs nothing
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.fanout"):
        build_dataset(config)
    assert not [r for r in caplog.records if r.name == "tasks.fanout"]


def test_an_edited_receipt_is_redone_not_summed(built, corpus, caplog):
    """A receipt still valid JSON but with a count changed fails its checksum: the rerun redoes its
    shard (logged once, naming it) and the build reconciles as before. A receipt edited inside a
    stage summary is read from its own object instead."""
    config, manifest_uri = built
    store = open_store(config.output).child(f"datasets/sample/{config.resolved_build_id}")
    before = build_objects(config.output, receipts=False)
    receipt = "receipts/ingest/000001.json"
    edited = json.loads(store.get_bytes(receipt))
    source = next(iter(edited["sources"]))
    edited["sources"][source]["docs_in"] += 1
    store.put_bytes(receipt, json.dumps(edited).encode())
    summary = StageSummary.from_parquet("tokenize", store.get_bytes("summaries/tokenize.parquet")).table
    documents = summary.column("counts.documents").to_pylist()
    documents[0] += 1
    summary = summary.set_column(summary.column_names.index("counts.documents"), "counts.documents", pa.array(documents))
    store.put_bytes("summaries/tokenize.parquet", StageSummary("tokenize", summary).to_parquet())
    with caplog.at_level("WARNING", logger="tasks.fanout"):
        assert build_dataset(config) == manifest_uri
    assert build_objects(config.output, receipts=False) == before
    assert_reconciles(manifest_uri, corpus)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tasks.fanout"]
    assert sum(receipt in w and "checksum" in w for w in warnings) == 1, warnings
    assert sum("summaries/tokenize.parquet" in w and "checksum" in w for w in warnings) == 1, warnings
    assert json.loads(store.get_bytes(receipt))["sources"][source]["docs_in"] == edited["sources"][source]["docs_in"] - 1


def test_outputs_do_not_depend_on_the_number_of_workers(corpus, tmp_path):
    outputs = {}
    for parallelism in (1, 2):
        config = sample_config(corpus, str(tmp_path / f"p{parallelism}"), parallelism=parallelism)
        build_dataset(config)
        outputs[parallelism] = {
            k: v for k, v in build_objects(config.output).items() if k.endswith(("manifest.json", SHARD_TABLE, ".bin", ".idx"))
        }
    assert outputs[1] == outputs[2] and len(outputs[1]) > 3


def test_killed_flow_reruns_to_identical_output(corpus, tmp_path, prefect_server):
    reference = sample_config(corpus, str(tmp_path / "clean"))
    build_dataset(reference)
    config = sample_config(corpus, str(tmp_path / "killed"))
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "build-dataset", str(config_path)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    receipts = tmp_path / "killed" / "datasets" / "sample" / config.resolved_build_id / "receipts"
    deadline = time.monotonic() + 240
    while not (receipts / "exact-hash").is_dir() and time.monotonic() < deadline:
        assert process.poll() is None, "the build finished or failed before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (receipts.parent / "manifest.json").exists()
    build_dataset(config)
    assert build_objects(config.output, receipts=False) == build_objects(reference.output, receipts=False)


def test_bad_records_are_quarantined_and_counted(corpus, tmp_path):
    bad = tmp_path / "bad" / "bad.jsonl"
    bad.parent.mkdir()
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"], size=(5, 60))
    lines = [json.dumps({"text": " ".join(row)}) for row in words]  # five different documents
    lines += ['{"text": "truncated', b"\xff\xfe invalid utf-8".decode("latin-1"), "[1, 2]", json.dumps({"text": ""})]
    bad.write_text("\n".join(lines) + "\n", encoding="latin-1")
    config = BuildConfig.model_validate({
        "name": "bad", "output": str(tmp_path / "out"),
        "sources": [{"name": "web", "uri": str(bad), "format": "jsonl"}],
        "tokenizer": {"train": {"vocab_size": 300}}, "filters": {"min_chars": 1},
    })
    manifest = load_manifest(build_dataset(config))
    web = manifest.sources["web"]
    assert (web.docs_in, web.kept, web.malformed, web.filtered) == (9, 5, 3, 1)
    store = open_store(config.output).child(f"datasets/bad/{config.resolved_build_id}")
    quarantined = [json.loads(line) for line in store.get_text("quarantine/web/000000.jsonl").splitlines()]
    assert [q["line"] for q in quarantined] == [6, 7, 8]

    strict = config.model_copy(update={"quarantine": False, "output": str(tmp_path / "strict")})
    with pytest.raises(IngestError, match=r"bad\.jsonl.*6"):
        build_dataset(strict)
    assert not any(key.endswith("manifest.json") for key in open_store(strict.output).list())


def test_inputs_are_checked_before_anything_is_written(corpus, tmp_path):
    empty = sample_config(corpus, str(tmp_path / "a"))
    empty.sources[0] = empty.sources[0].model_copy(update={"uri": str(tmp_path / "nothing" / "*.jsonl.zst")})
    with pytest.raises(PlanError, match=r"slimpajama.*nothing"):
        build_dataset(empty)
    missing = sample_config(corpus, str(tmp_path / "b"), tokenizer={"model": str(tmp_path / "no.model")})
    with pytest.raises(PlanError, match="no.model"):
        build_dataset(missing)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
