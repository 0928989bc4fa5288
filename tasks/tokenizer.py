"""Stage 5: the tokenizer. Load the user's SentencePiece model, or train a BPE one (byte
fallback, identity normalization so code round-trips) on a seeded sample of kept documents."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from functools import lru_cache, partial

import numpy as np
import pyarrow as pa
import sentencepiece as spm
import xxhash

from storage import build_layout as layout
from storage.manifest import ObjectInfo, ShardResult, TokenizerInfo, record_bytes, sha256_bytes
from storage.store import ObjectNotFound, Store, open_object
from tasks.config import TokenizerConfig, TokenizerTrain
from tasks.fanout import read_summary, read_valid, run_stage
from tasks.parquet_io import read_table
from tasks.plan import Build, PlannedFile
from tasks.removals import deduplicated_ids
from tasks.stage import INGEST, TOKENIZER, TOKENIZER_SAMPLE, Stage, stage_task
from tasks.stage_counts import TokenizerCounts, TokenizerSampleCounts

SAMPLE_SPREAD = 4  # the sample is drawn from shards holding this many times sample_bytes of text
DEDUP_MARGIN = 1.5  # documents are drawn at this multiple of the needed rate: dedup removes some


class TokenizerError(ValueError):
    pass


def load_sentencepiece(model: bytes, name: str) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except (RuntimeError, OSError) as error:
        raise TokenizerError(f"{name} is not a SentencePiece model: {error}") from None
    if processor.eos_id() < 0:
        raise TokenizerError(f"tokenizer {name} has no EOS token; documents need one appended")
    return processor


@lru_cache(maxsize=2)
def cached_processor(uri: str, sha256: str) -> spm.SentencePieceProcessor:
    """One processor per worker process and tokenizer, not one per task or document."""
    store, key = open_object(uri)
    return load_sentencepiece(store.get_bytes(key), uri)


def sampled_shards(plan: list[PlannedFile], kept_bytes: dict[str, int], sample_bytes: int, seed: int) -> list[PlannedFile]:
    """A seeded subset of docs shards holding SAMPLE_SPREAD x sample_bytes of text (all when
    the corpus is smaller), in a seeded order; it depends only on the ingest summary and the seed."""
    chosen, held = [], 0
    for position in np.random.default_rng(seed).permutation(len(plan)).tolist():
        if held >= SAMPLE_SPREAD * sample_bytes:
            break
        chosen.append(plan[position])
        held += kept_bytes[plan[position].shard]
    return chosen


def write_sample(store: Store, file: PlannedFile, rate: float, seed: int) -> ShardResult:
    """The non-empty lines of a seeded sample of one docs shard's kept documents: a document is
    in it when a hash of (seed, id) falls below `rate`, so the sample depends only on the data."""
    docs = read_table(store, layout.docs(file.source, file.shard), columns=["id", "text"])
    ids = docs.column("id").to_numpy()
    threshold = int(min(1.0, rate) * (2**64 - 1))
    drawn = np.array([xxhash.xxh64_intdigest(i.to_bytes(8, "little"), seed) <= threshold for i in ids.tolist()], dtype=bool)
    rows = np.flatnonzero(drawn & ~np.isin(ids, deduplicated_ids(store, file)))
    texts = docs.column("text").take(pa.array(rows)).to_pylist()
    body = "".join(f"{line}\n" for text in texts for line in text.splitlines() if line.strip()).encode("utf-8")
    key = layout.tokenizer_sample(file.shard)
    store.put_bytes(key, body)
    outputs = [ObjectInfo(key=key, size=len(body), sha256=sha256_bytes(body))]
    return ShardResult(outputs=outputs, counts=TokenizerSampleCounts(bytes=len(body)))


def sample_lines(store: Store, keys: list[str], sample_bytes: int) -> Iterator[str]:
    """Lines of the sample files in order, until about `sample_bytes` of text."""
    taken = 0
    for key in keys:
        for line in store.get_text(key).splitlines():
            yield line
            taken += len(line.encode("utf-8")) + 1
            if taken >= sample_bytes:
                return


def train_model(lines: Iterator[str], train: TokenizerTrain) -> bytes:
    """A Llama-2-style BPE model: byte fallback, split digits, identity normalization."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model,
        model_type="bpe",
        vocab_size=train.vocab_size,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        character_coverage=train.character_coverage,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def make_tokenizer(store: Store, config: TokenizerConfig, sample_keys: list[str], _item: str) -> ShardResult:
    """The one item of the tokenizer stage: load the user's model or train one on the sample."""
    if config.model is not None:
        source, key = open_object(config.model)
        try:
            model = source.get_bytes(key)
        except ObjectNotFound:
            raise TokenizerError(f"tokenizer model {config.model} does not exist") from None
    else:
        model = train_model(sample_lines(store, sample_keys, config.train.sample_bytes), config.train)
    processor = load_sentencepiece(model, config.model or "the trained tokenizer")
    store.put_bytes(layout.TOKENIZER_MODEL, model)
    info = TokenizerInfo(
        key=layout.TOKENIZER_MODEL,
        sha256=sha256_bytes(model),
        vocab_size=processor.vocab_size(),
        bos_id=processor.bos_id(),
        eos_id=processor.eos_id(),
        trained=config.model is None,
    )
    body = record_bytes(info)
    store.put_bytes(layout.TOKENIZER_INFO, body)
    outputs = [
        ObjectInfo(key=layout.TOKENIZER_MODEL, size=len(model), sha256=info.sha256),
        ObjectInfo(key=layout.TOKENIZER_INFO, size=len(body), sha256=sha256_bytes(body)),
    ]
    return ShardResult(outputs=outputs, counts=TokenizerCounts(vocab_size=info.vocab_size))


def _sample_shard(file: PlannedFile) -> str:
    return file.shard


def _only_shard(_item: str) -> str:
    return TOKENIZER


@stage_task(TOKENIZER)
def tokenizer(build: Build) -> TokenizerInfo:
    store, config = build.store, build.config
    sample_keys: list[str] = []
    if config.tokenizer.train is not None:
        ingested = read_summary(store, INGEST)
        kept_bytes = ingested.source_sum("bytes_in")
        sample_bytes = config.tokenizer.train.sample_bytes
        files = sampled_shards(build.plan, kept_bytes, sample_bytes, config.seed)
        rate = DEDUP_MARGIN * sample_bytes / max(1, sum(kept_bytes[f.shard] for f in files))
        run_stage(
            store,
            Stage(TOKENIZER_SAMPLE, files, _sample_shard, lambda f: write_sample(store, f, rate, config.seed), (layout.TOKENIZER_SAMPLE,)),
            config, config.parallelism,
        )
        sample_keys = [layout.tokenizer_sample(f.shard) for f in files]
    work = partial(make_tokenizer, store, config.tokenizer, sample_keys)
    run_stage(store, Stage(TOKENIZER, [TOKENIZER], _only_shard, work, (layout.TOKENIZER_MODEL, layout.TOKENIZER_INFO)), config)
    info = read_valid(store, layout.TOKENIZER_INFO, TokenizerInfo)
    if info is None:
        raise TokenizerError(f"{store.url(layout.TOKENIZER_INFO)} vanished or was damaged while the build ran; rerun it")
    return info
