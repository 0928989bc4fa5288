"""The tokenizer's training sample: drawn from only as many docs shards as give it, spread over
each source; the same bytes on any number of workers; topped up when dedup leaves it short."""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Collection
from functools import partial
from pathlib import Path

import pytest

from storage import build_layout as layout
from storage.s3 import s3_client
from tasks.exact_dedup import run_exact_dedup
from tasks.fanout import read_summary, run_stage
from tasks.ingest import ingest_file
from tasks.partitioning import EXACT_ROW_BYTES, ingested_documents, partitions
from tasks.plan import Build, freeze_plan, shard_of
from tasks.stage import INGEST, Stage
from tasks.tokenizer import MARGIN, SPREAD_FILES, draw_sample, make_tokenizer, sample_lines
from tests.builds import tiny_config

DOCS_PER_FILE = 4
DOC_BYTES = 60 * 6 - 1  # 60 five-letter words: every file holds the same kept bytes
SEED = 42


def write_corpus(folder: Path, files: int, copies_of_first: Collection[int] = ()) -> Path:
    """`files` jsonl files of DOCS_PER_FILE random documents; the files in `copies_of_first` repeat file 0's."""
    rng = random.Random(files)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(2000)]
    folder.mkdir(parents=True)
    first = None
    for index in range(files):
        lines = [json.dumps({"text": " ".join(rng.choices(vocabulary, k=60))}) for _ in range(DOCS_PER_FILE)]
        first = first or lines
        (folder / f"part-{index:05d}.jsonl").write_text("\n".join(first if index in copies_of_first else lines) + "\n")
    return folder


def deduplicated_build(inputs: Path, output: str, sample_bytes: int, **updates) -> Build:
    """A build's plan, ingest and exact dedup, run inline: what the tokenizer step starts from."""
    train = {"vocab_size": 512, "sample_bytes": sample_bytes}
    config = tiny_config(f"{inputs}/*.jsonl", output, tokenizer={"train": train}, **updates)
    build = Build(config=config)
    store = build.store
    freeze_plan(config, store)
    run = partial(run_stage, store, inline=True)
    sources = {source.name: source for source in config.sources}

    def ingest(file):
        return ingest_file(file, sources[file.source], config.filters, config.quarantine, store)

    run(Stage(INGEST, build.plan, shard_of, ingest, (layout.DOCS, layout.QUARANTINE)))
    documents, sizes = ingested_documents(read_summary(store, INGEST))
    budget = config.task_memory_bytes
    run_exact_dedup(store, build.plan, sizes, partitions(documents, EXACT_ROW_BYTES, budget), budget, run)
    return build


def sample_of(build: Build, run) -> list[tuple[list[str], int]]:
    config, ingested = build.config, read_summary(build.store, INGEST)
    sample_bytes = config.tokenizer.train.sample_bytes
    return draw_sample(build.store, build.plan, ingested, sample_bytes, config.seed, config.task_memory_bytes, run)


def traced_sample(build: Build) -> tuple[list[tuple[list[str], int]], list[str], int]:
    """The sample drawn inline on S3, the docs shards it read (sorted) and its requests."""
    docs, calls = [], []

    def record(model, params, **_):
        calls.append(model.name)
        if model.name == "GetObject" and f"/{layout.DOCS}" in params["url_path"]:
            docs.append(params["url_path"].rsplit("/", 1)[-1])

    s3_client().meta.events.register("before-call.s3", record)
    try:
        sample = sample_of(build, partial(run_stage, build.store, inline=True))
    finally:
        s3_client().meta.events.unregister("before-call.s3", record)
    return sample, sorted(docs), len(calls)


def test_the_sample_reads_the_same_docs_shards_however_many_files_there_are(s3_bucket_uri, tmp_path):
    """At one sample size, 40 and 200 input files: the same number of docs shards read (enough for
    the sample with its margin, spread over the plan), and no others; before, the sample read docs
    shards holding 4x the sample: all 40 files, 80 of the 200."""
    needed_files = 20
    sample_bytes = needed_files * DOCS_PER_FILE * DOC_BYTES
    read: dict[int, list[str]] = {}
    requests: dict[int, int] = {}
    for files in (40, 200):
        build = deduplicated_build(write_corpus(tmp_path / f"raw{files}", files), f"{s3_bucket_uri}/sample-{files}", sample_bytes)
        ((parts, quota),), read[files], requests[files] = traced_sample(build)
        assert quota == sample_bytes
        assert sum(len(line) + 1 for line in sample_lines(build.store, parts, quota)) >= quota
    chosen = math.ceil(MARGIN * needed_files)
    assert len(read[40]) == len(read[200]) == chosen, read
    assert read[40][0] == read[200][0] == "000000.parquet"  # spread from the first file ...
    assert read[200][-1] >= "000190.parquet"  # ... to the last
    assert requests[40] == requests[200], requests


def test_the_sample_is_the_same_on_one_or_two_workers_and_on_a_rerun(tmp_path, ray_local):
    """Small groups (a 64 KiB task budget), so two workers run them at once in any order."""
    inputs = write_corpus(tmp_path / "raw", 48)
    objects, models = {}, {}
    for workers in (1, 2):
        build = deduplicated_build(inputs, str(tmp_path / f"w{workers}"), 24 * DOCS_PER_FILE * DOC_BYTES, task_memory_bytes=1 << 16)
        store = build.store
        sample = sample_of(build, partial(run_stage, store, max_in_flight=workers))
        assert len(sample[0][0]) > 2  # several groups
        objects[workers] = {key: store.get_bytes(key) for key in store.list(layout.TOKENIZER_SAMPLE)}
        models[workers] = make_tokenizer(store, build.config.tokenizer, sample, "tokenizer").outputs[0].sha256
        assert sample_of(build, partial(run_stage, store, inline=True)) == sample
        assert {key: store.get_bytes(key) for key in store.list(layout.TOKENIZER_SAMPLE)} == objects[workers]
    assert objects[1] == objects[2] and len(objects[1]) > 2
    assert models[1] == models[2]


def test_every_source_gives_its_share_of_the_kept_text(tmp_path):
    """Two sources, 30 and 10 files of the same size: quotas 3:1 of the sample, each met from
    that source's own files (a sample of most of the text: no draw's chance at 40 documents)."""
    sources = [{"name": name, "uri": str(write_corpus(tmp_path / name, files)) + "/*.jsonl", "format": "jsonl"}
               for name, files in (("web", 30), ("code", 10))]
    sample_bytes = 32 * DOCS_PER_FILE * DOC_BYTES
    build = deduplicated_build(tmp_path / "web", str(tmp_path / "out"), sample_bytes, sources=sources)
    (web, web_quota), (code, code_quota) = sample_of(build, partial(run_stage, build.store, inline=True))
    assert (web_quota, code_quota) == (sample_bytes * 3 // 4, sample_bytes // 4)
    for parts, quota in ((web, web_quota), (code, code_quota)):
        assert sum(len(line) + 1 for line in sample_lines(build.store, parts, quota)) >= quota
    ordinals = {source: {f.ordinal for f in build.plan if f.source == source} for source in ("web", "code")}
    assert {int(key.rsplit("/", 1)[-1][:6]) for key in code} <= ordinals["code"]
    assert {int(key.rsplit("/", 1)[-1][:6]) for key in web} <= ordinals["web"]


# The first round's files for 40 files (SPREAD_FILES in spread order) are the even ones:
# "half" repeats file 0 in 7 of them, "all" in every file.
ROUND_ONE = [0, 32, 16, 8, 24, 4, 36, 20, 12, 28, 2, 34, 18, 10, 26, 6]


@pytest.mark.parametrize("copies", ["half", "all"])
def test_a_source_short_after_dedup_is_topped_up_from_its_next_files(s3_bucket_uri, tmp_path, copies):
    """When dedup removes much of what the first round drew, a second round, sized from that
    yield, draws from the next files in spread order until the quota is met; when every file
    repeats file 0 the rounds end with every file read and the sample is what there is."""
    files = 40
    duplicates = set(ROUND_ONE[2::2]) if copies == "half" else set(range(1, files))
    inputs = write_corpus(tmp_path / "raw", files, copies_of_first=duplicates)
    sample_bytes = 8 * DOCS_PER_FILE * DOC_BYTES
    build = deduplicated_build(inputs, f"{s3_bucket_uri}/short-{copies}", sample_bytes)
    ((parts, quota),), read, _ = traced_sample(build)
    held = sum(len(build.store.get_bytes(key)) for key in parts)
    assert quota == sample_bytes and len(parts) >= 2  # the second round's group
    assert SPREAD_FILES == len(ROUND_ONE) and {f"{i:06d}.parquet" for i in ROUND_ONE} < set(read)
    if copies == "half":
        assert len(ROUND_ONE) < len(read) < files and held >= quota
    else:
        assert len(read) == files and 0 < held < quota  # only file 0's documents were kept
