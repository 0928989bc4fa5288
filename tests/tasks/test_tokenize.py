"""The tokenize stage: its shards are byte for byte what encoding whole documents with
SentencePiece and shuffling them gives (the stage before the piece cache and the streaming
read), on a local folder and on S3, and it reads a docs shard in bounded batches."""

from __future__ import annotations

import json
import random
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from storage import build_layout as layout
from storage.manifest import DocumentConvention, TokenizerInfo, sha256_bytes
from storage.shards import ShardWriter, token_dtype
from storage.store import Store, open_store
from tasks.config import TokenizerTrain
from tasks.ingest.docs_writer import DOC_SCHEMA, DocsWriter
from tasks.parquet_io import read_table
from tasks.plan import PlannedFile, document_id
from tasks.removals import deduplicated_ids, exact_removed_ids, merge_block, write_removed
from tasks.stage_counts import TokenizeCounts
from tasks.tokenize import tokenize_shard
from tasks.tokenizer import train_model
from tests.builds import tiny_corpus
from tests.tasks.tokenizer_texts import HOSTILE, LONG, corpus_texts, random_texts, training_lines

SEED = 42


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    return corpus_texts(tmp_path_factory.mktemp("corpus"), target_bytes=1 << 20)


@pytest.fixture(scope="module")
def texts(corpus, tmp_path_factory) -> list[str]:
    """The test corpora, hostile and random texts: more documents than ingest puts in one row
    group (2048), in a seeded order."""
    tiny = tiny_corpus(tmp_path_factory.mktemp("tiny"), files=1, docs_per_file=300, seed=1)
    texts = corpus + [json.loads(line)["text"] for line in (tiny / "part-00000.jsonl").read_text().splitlines()]
    texts += HOSTILE + LONG[:3] + random_texts(2000, seed=5)
    random.Random(0).shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def model(corpus) -> bytes:
    return train_model(iter(training_lines(corpus)), TokenizerTrain(vocab_size=1024))


def put_docs(store: Store, file: PlannedFile, texts: list[str], folder: Path, removed_every: int, group_rows: int | None = None) -> None:
    """A docs shard as ingest writes it (or in row groups of `group_rows` documents), and every
    `removed_every`-th document removed by exact dedup."""
    path = folder / f"{file.shard}.parquet"
    ids = [document_id(file.ordinal, record) for record in range(len(texts))]
    if group_rows is None:
        with DocsWriter(path, file.source) as docs:
            for doc_id, text in zip(ids, texts):
                docs.add(doc_id, text, "{}", len(text.encode()))
    else:
        columns = [ids, [file.source] * len(texts), texts, ["{}"] * len(texts)]
        pq.write_table(pa.table(columns, schema=DOC_SCHEMA), path, row_group_size=group_rows)
    store.put_file(layout.docs(file.source, file.shard), path)
    removed = np.array(ids[::removed_every], np.int64)
    removed_ids = exact_removed_ids(1, file.ordinal + 1)  # one hash range found them all
    write_removed(store, removed_ids, 0, removed, removed - 1)
    merge_block(store, removed_ids, layout.exact_merged, layout.removed_block(file.ordinal))


def put_tokenizer(store: Store, model: bytes) -> TokenizerInfo:
    store.put_bytes(layout.TOKENIZER_MODEL, model)
    processor = spm.SentencePieceProcessor(model_proto=model)
    return TokenizerInfo(key=layout.TOKENIZER_MODEL, sha256=sha256_bytes(model), vocab_size=processor.vocab_size(),
                         bos_id=processor.bos_id(), eos_id=processor.eos_id(), trained=True)


def stage_before(store: Store, file: PlannedFile, tokenizer: TokenizerInfo, convention: DocumentConvention,
                 shard_tokens: int, folder: Path) -> dict[str, bytes]:
    """The stage as it was: the whole shard's texts, shuffled, each encoded whole by SentencePiece."""
    processor = spm.SentencePieceProcessor(model_proto=store.get_bytes(tokenizer.key))
    docs = read_table(store, layout.docs(file.source, file.shard), columns=["id", "text"])
    keep = np.flatnonzero(~np.isin(docs.column("id").to_numpy(), deduplicated_ids(store, file)))
    texts = docs.column("text").to_pylist()
    order = keep[np.random.default_rng([SEED, file.ordinal]).permutation(len(keep))]
    dtype, prefixes = token_dtype(tokenizer.vocab_size), []
    writer = None
    for ids in processor.encode([texts[i] for i in order]):
        ids = convention.frame(ids, tokenizer)
        if writer is None or (writer.documents and writer.tokens + len(ids) > shard_tokens):
            if writer is not None:
                writer.close()
            prefixes.append(layout.tokens(file.source, file.shard, len(prefixes)))
            writer = ShardWriter(folder / prefixes[-1], dtype)
        writer.add_document(ids)
    writer.close()
    return {f"{p}{suffix}": (folder / f"{p}{suffix}").read_bytes() for p in prefixes for suffix in (".bin", ".idx")}


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no_bos"])
def test_shards_are_byte_identical_to_whole_document_encoding(store, texts, model, tmp_path, bos):
    file = PlannedFile(source="web", uri="file:///in/part-3.jsonl", size=1, ordinal=3)
    put_docs(store, file, texts, tmp_path, removed_every=7)
    tokenizer, convention = put_tokenizer(store, model), DocumentConvention(bos=bos)
    shard_tokens = 60_000
    result = tokenize_shard(store, file, tokenizer, convention, shard_tokens, SEED, cache_bytes=1 << 20)
    expected = stage_before(store, file, tokenizer, convention, shard_tokens, tmp_path / "before")
    assert len(expected) >= 8  # several token shards
    written = {key: store.get_bytes(key) for key in store.list(layout.TOKENS)}
    assert written.keys() == expected.keys()
    for key in expected:
        assert written[key] == expected[key], key
    kept = len(texts) - len(texts[::7])
    assert result.counts.documents == kept == sum(s.documents for s in result.token_shards)
    assert [info.key for info in result.outputs] == sorted(expected)


def test_a_shard_dedup_emptied_writes_no_token_shard(tmp_path, model):
    store = open_store(tmp_path / "store")
    file = PlannedFile(source="web", uri="file:///in/part-0.jsonl", size=1, ordinal=0)
    put_docs(store, file, ["only", "", "removed documents"], tmp_path, removed_every=1)
    result = tokenize_shard(store, file, put_tokenizer(store, model), DocumentConvention(), 1000, SEED, cache_bytes=1 << 20)
    assert result.outputs == [] and result.counts == TokenizeCounts(documents=0, tokens=0)
    assert list(store.list(layout.TOKENS)) == []


def traced_peak(store: Store, file: PlannedFile, texts: list[str], folder: Path, model: bytes) -> int:
    put_docs(store, file, texts, folder, removed_every=1000, group_rows=20)
    tokenizer = put_tokenizer(store, model)
    tracemalloc.start()  # numpy's and Python's allocations; Arrow's own pool is not traced
    try:  # a cache of 1 byte is emptied before each batch: what stays is the stage's own
        tokenize_shard(store, file, tokenizer, DocumentConvention(), 1 << 20, SEED, cache_bytes=1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_a_docs_shard_is_read_in_bounded_batches(tmp_path, corpus, model):
    """Python's peak hardly grows with the shard: it holds a row group's texts, never all of
    them. The larger shard is the smaller one three times over, so their batches are alike."""
    store = open_store(tmp_path / "store")
    words, rng = sorted(w for w in set(" ".join(corpus).split()) if w.isascii()), random.Random(4)
    small = [" ".join(rng.choices(words, k=1200)) for _ in range(120)]
    small_peak = traced_peak(store, PlannedFile(source="web", uri="file:///a", size=1, ordinal=1), small, tmp_path, model)
    large_peak = traced_peak(store, PlannedFile(source="web", uri="file:///b", size=1, ordinal=2), small * 3, tmp_path, model)
    as_strings = 2 * sum(map(sys.getsizeof, small))  # what reading the larger shard's texts as Python strings adds
    assert as_strings > 2_000_000
    assert large_peak - small_peak < 0.25 * as_strings, (small_peak, large_peak, as_strings)  # was > as_strings
