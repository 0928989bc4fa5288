"""Stage 5: the tokenizer. Load the user's SentencePiece model, or train a BPE one (byte
fallback, identity normalization so code round-trips) on a seeded sample of kept documents."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import sentencepiece as spm
import xxhash

from storage.manifest import ObjectInfo, Receipt, TokenizerInfo, read_record, sha256_bytes, write_record
from storage.store import ObjectNotFound, Store, open_object
from tasks.config import TokenizerTrain
from tasks.fanout import finished_receipt, receipt_key
from tasks.ingest import docs_key
from tasks.parquet_io import read_table
from tasks.plan import Build, PlannedFile
from tasks.removals import removed_ids
from tasks.stage import stage_task

TOKENIZER_KEY = "tokenizer/tokenizer.model"
INFO_KEY = "tokenizer/tokenizer.json"


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


def sample_lines(store: Store, plan: list[PlannedFile], kept_bytes: int, sample_bytes: int, seed: int) -> Iterator[str]:
    """Non-empty lines of a seeded sample of kept documents, about `sample_bytes` of text.

    Each document is in the sample when a hash of (seed, id) falls below the sampling rate,
    so the sample depends only on the documents and the seed.
    """
    rate = min(1.0, 1.5 * sample_bytes / max(kept_bytes, 1))
    threshold = int(rate * (2**64 - 1))
    taken = 0
    for position in np.random.default_rng(seed).permutation(len(plan)):
        file = plan[position]
        docs = read_table(store, docs_key(file), columns=["id", "text"])
        removed = set(removed_ids(store, file).tolist())
        for doc_id, text in zip(docs.column("id").to_pylist(), docs.column("text").to_pylist()):
            if doc_id in removed or xxhash.xxh64_intdigest(doc_id.to_bytes(8, "little"), seed) > threshold:
                continue
            for line in text.splitlines():
                if line.strip():
                    yield line
            taken += len(text.encode("utf-8"))
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


@stage_task("tokenizer")
def tokenizer(build: Build, kept_bytes: int) -> TokenizerInfo:
    store, config = build.store, build.config.tokenizer
    if finished_receipt(store, "tokenizer", "tokenizer") is not None:
        return read_record(store, INFO_KEY, TokenizerInfo)
    if config.model is not None:
        source, key = open_object(config.model)
        try:
            model = source.get_bytes(key)
        except ObjectNotFound:
            raise TokenizerError(f"tokenizer model {config.model} does not exist") from None
    else:
        lines = sample_lines(store, build.plan, kept_bytes, config.train.sample_bytes, build.config.seed)
        model = train_model(lines, config.train)
    processor = load_sentencepiece(model, config.model or "the trained tokenizer")
    store.put_bytes(TOKENIZER_KEY, model)
    info = TokenizerInfo(
        key=TOKENIZER_KEY,
        sha256=sha256_bytes(model),
        vocab_size=processor.vocab_size(),
        bos_id=processor.bos_id(),
        eos_id=processor.eos_id(),
        trained=config.model is None,
    )
    write_record(store, INFO_KEY, info)
    outputs = [ObjectInfo(key=TOKENIZER_KEY, size=len(model), sha256=info.sha256)]
    write_record(store, receipt_key("tokenizer", "tokenizer"), Receipt(stage="tokenizer", shard="tokenizer", outputs=outputs))
    return info
