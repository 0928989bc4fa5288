"""The sample corpus: its files parse, its planted exact duplicates are exactly its repeats, its
planted near duplicates are exactly what near dedup removes, it is seeded."""

from __future__ import annotations

import glob
import hashlib
import itertools
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import zstandard

from demo.sample_corpus import EXCLUDED_SET, SLIMPAJAMA_SETS, make_sample_corpus
from storage import build_layout as layout
from storage.store import LocalStore
from tasks import removals
from tasks.config import BuildConfig
from tasks.fanout import run_stage
from tasks.ingest import docs_key, ingest_file
from tasks.near_dedup.minhash import normalize
from tasks.near_dedup.steps import DocsShard, run_near_dedup
from tasks.plan import document_id, make_plan

TARGET = 1 << 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return make_sample_corpus(tmp_path_factory.mktemp("corpus"), target_bytes=TARGET, seed=7)


def read_records(root: Path, name: str) -> list[dict]:
    if name.endswith(".jsonl.zst"):
        data = zstandard.ZstdDecompressor().stream_reader((root / name).open("rb")).read()
        return [orjson.loads(line) for line in data.splitlines()]
    return pq.read_table(root / name).to_pylist()


def all_records(summary: dict) -> list[tuple[str, str, int, dict]]:
    """(source, file, record number, record) in plan order."""
    root = Path(summary["root"])
    return [
        (source, name, number, record)
        for source, info in summary["sources"].items()
        for name in info["files"]
        for number, record in enumerate(read_records(root, name))
    ]


def text_of(record: dict) -> str:
    return record.get("text", record.get("content"))


def shingles(text: str, n: int = 13) -> set[str]:
    """The near dedup's default shingles: character 13-grams of the normalized text."""
    text = normalize(text)
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


def test_files_parse_and_match_the_summary(corpus):
    root = Path(corpus["root"])
    records = all_records(corpus)
    for source, info in corpus["sources"].items():
        mine = [r for s, _, _, r in records if s == source]
        assert len(info["files"]) > 1 and len(mine) == info["documents"] == corpus["documents"][source]
        assert sum(len(text_of(r).encode()) for r in mine) == info["bytes"]
        assert all(len(text_of(r)) >= 400 for r in mine)
    slimpajama = [r for s, _, _, r in records if s == "slimpajama"]
    assert {r["meta"]["redpajama_set_name"] for r in slimpajama} == set(SLIMPAJAMA_SETS)
    excluded = sum(r["meta"]["redpajama_set_name"] == EXCLUDED_SET for r in slimpajama)
    assert excluded == corpus["sources"]["slimpajama"]["excluded"] > 0
    starcoder = pq.read_schema(root / corpus["sources"]["starcoder"]["files"][0])
    assert {"content", "lang", "max_stars_repo_path"} <= set(starcoder.names)
    total = sum(info["bytes"] for info in corpus["sources"].values())
    assert TARGET <= total < TARGET * 1.2

    config = BuildConfig.from_yaml(corpus["config"])
    assert config.tokenizer.train.vocab_size == 4096
    for src in config.sources:
        assert sorted(glob.glob(src.uri)) == [str(root / f) for f in corpus["sources"][src.name]["files"]]


def test_planted_duplicates_are_exactly_the_repeats(corpus):
    first_seen: dict[bytes, tuple[str, str, int]] = {}
    repeats = []
    for source, name, number, record in all_records(corpus):
        if record.get("meta", {}).get("redpajama_set_name") == EXCLUDED_SET:
            continue
        digest = hashlib.sha256(text_of(record).encode()).digest()
        if digest in first_seen:
            original = first_seen[digest]
            assert original[0] == source  # never across sources
            repeats.append({"source": source, "file": name, "record": number,
                            "original_file": original[1], "original_record": original[2]})  # fmt: skip
        else:
            first_seen[digest] = (source, name, number)
    assert repeats == corpus["duplicates"]
    assert {d["source"] for d in repeats} == {"slimpajama", "starcoder"}
    assert any(d["file"] == d["original_file"] for d in repeats)
    assert any(d["file"] != d["original_file"] for d in repeats)


def test_no_near_duplicates_beyond_the_planted_copies(corpus):
    """Paragraph mixtures stay well apart: word 5-gram Jaccard of any two distinct prose documents < 0.8."""
    near_copies = {(d["file"], d["record"]) for d in corpus["near_duplicates"]}
    seen, word_shingles = set(), []
    for _, name, number, record in all_records(corpus):
        text = text_of(record)
        if ("meta" in record and record["meta"]["redpajama_set_name"] != EXCLUDED_SET and text not in seen
                and (name, number) not in near_copies):
            seen.add(text)
            words = text.split()
            word_shingles.append({" ".join(words[i : i + 5]) for i in range(len(words) - 4)})
    worst = max(len(a & b) / len(a | b) for a, b in itertools.combinations(word_shingles, 2))
    assert worst < 0.8


def test_planted_near_duplicates_are_close_copies_of_their_originals(corpus):
    root = Path(corpus["root"])
    planted = corpus["near_duplicates"]
    assert len(planted) >= 3
    for near in planted:
        copy = text_of(read_records(root, near["file"])[near["record"]])
        original = read_records(root, near["original_file"])[near["original_record"]]
        assert original.get("meta", {}).get("redpajama_set_name") != EXCLUDED_SET
        assert copy != text_of(original) and near["words_changed"] >= 1
        a, b = shingles(copy), shingles(text_of(original))
        assert 0.85 <= len(a & b) / len(a | b) < 1.0, near  # well above the threshold of 0.8


@pytest.fixture(scope="module")
def ingested(corpus, tmp_path_factory):
    """The corpus's build config, plan, and build folder with every file ingested; the kept
    (id, text) pairs; and a planted entry's document id."""
    config = BuildConfig.from_yaml(corpus["config"])
    plan = make_plan(config)
    out = LocalStore(tmp_path_factory.mktemp("build"))
    sources = {s.name: s for s in config.sources}
    kept, receipts = [], []
    for file in plan:
        receipts.append(ingest_file(file, sources[file.source], config.filters, config.quarantine, out))
        table = pq.read_table(out.root / docs_key(file), columns=["id", "text"])
        kept += zip(table["id"].to_pylist(), table["text"].to_pylist())
    root_uri = Path(corpus["root"]).as_uri() + "/"
    ordinal = {f.uri.removeprefix(root_uri): f.ordinal for f in plan}
    return config, plan, out, receipts, kept, lambda planted: document_id(ordinal[planted["file"]], planted["record"])


def test_ingest_keeps_every_document_and_exact_repeats_are_the_planted_ids(corpus, ingested):
    _, plan, _, receipts, kept, id_of = ingested
    for receipt in receipts:
        assert receipt.counts.malformed == 0
        assert receipt.counts.excluded == receipt.counts.filtered  # nothing is too short
    for name, info in corpus["sources"].items():
        assert sum(f.source == name for f in plan) == len(info["files"])
    assert len(kept) == sum(i["documents"] - i["excluded"] for i in corpus["sources"].values())

    seen, repeated = set(), []
    for doc_id, text in sorted(kept):
        if text in seen:
            repeated.append(doc_id)
        seen.add(text)
    assert repeated == sorted(id_of(d) for d in corpus["duplicates"])


def test_near_dedup_removes_exactly_the_planted_near_duplicates(corpus, ingested):
    """The build's near dedup (its config, in this process), after exact dedup has removed the
    planted exact copies: it removes the near copies, each for its original, and nothing else."""
    config, plan, out, _, _, id_of = ingested
    exact = np.array(sorted(id_of(d) for d in corpus["duplicates"]), dtype=np.int64)
    removed_ids = removals.exact_removed_ids(1, len(plan))  # one hash range found them all
    removals.write_removed(out, removed_ids, 0, exact, exact)
    removals.merge_block(out, removed_ids, layout.exact_merged, 0)
    shards = [DocsShard(file, docs_key(file), exclude=True, size=out.size(docs_key(file))) for file in plan]
    counts = run_near_dedup(out, shards, config.minhash, lambda stage: run_stage(out, stage, inline=True), 1 << 30)

    removed = {}
    for file in plan:
        ids, kept_ids = removals.removed_pairs(out, layout.near_merged, file)
        removed.update(zip(ids.tolist(), kept_ids.tolist()))
    planted = corpus["near_duplicates"]
    assert removed == {id_of(d): id_of({"file": d["original_file"], "record": d["original_record"]}) for d in planted}
    assert counts == {name: sum(d["source"] == name for d in planted) for name in corpus["sources"]}


def test_the_corpus_is_a_function_of_the_seed(corpus, tmp_path):
    again = make_sample_corpus(tmp_path / "again", target_bytes=TARGET, seed=7)
    other = make_sample_corpus(tmp_path / "other", target_bytes=TARGET, seed=8)
    files = [f for info in corpus["sources"].values() for f in info["files"]]

    def content(summary: dict) -> list[bytes]:
        return [(Path(summary["root"]) / f).read_bytes() for f in files]

    assert again["duplicates"] == corpus["duplicates"] and content(again) == content(corpus)
    assert again["near_duplicates"] == corpus["near_duplicates"]
    assert other["duplicates"] != corpus["duplicates"] and other["near_duplicates"] != corpus["near_duplicates"]
    assert (Path(other["root"]) / files[0]).read_bytes() != content(corpus)[0]


def test_making_the_same_corpus_again_keeps_its_files_so_a_planned_build_reruns(tmp_path):
    first = make_sample_corpus(tmp_path, target_bytes=TARGET, seed=7)
    config = BuildConfig.from_yaml(first["config"]).model_copy(update={"output": str(tmp_path / "out")})
    planned = make_plan(config)
    paths = [Path(first["root"]) / f for info in first["sources"].values() for f in info["files"]]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]

    make_sample_corpus(tmp_path, target_bytes=TARGET, seed=7)

    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == before
    assert [f.identity for f in make_plan(config)] == [f.identity for f in planned]
