"""Small synthetic dataset builds for loader and training tests: real token shards, a real manifest.

    uri = write_synthetic_build(store_uri, "toy", {"web": [50] * 40, "code": [30] * 20},
                                vocab_size=1000, seed=0, shard_tokens=500)

Documents get random tokens in [3, vocab_size) and end with EOS_ID, as the tokenize stage
writes them. The tokenizer file is a PLACEHOLDER (a short text, not a SentencePiece model):
the loader only needs the tokenizer's fingerprint and vocabulary size. The fingerprint is the
sha256 of that placeholder, which names `tokenizer`, so two builds with different
`tokenizer` labels have different fingerprints.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from storage.build_layout import SHARD_TABLE
from storage.manifest import (
    ShardTable,
    SourceAccounting,
    TokenizerInfo,
    TokenShard,
    canonical_json,
    new_manifest,
    put_manifest,
    read_manifest,
    read_shard_table,
    sha256_bytes,
    upload,
)
from storage.shards import ShardWriter, token_dtype
from storage.store import join_key, open_object, open_store

BOS_ID, EOS_ID = 1, 2
FIRST_TEXT_ID = 3


def write_synthetic_build(
    store_uri: str,
    name: str,
    sources: dict[str, list[int]],
    vocab_size: int,
    seed: int,
    shard_tokens: int,
    tokenizer: str = "synthetic",
) -> str:
    """Write a build of `sources` (source name -> document lengths, EOS included) to the store
    under datasets/<name>/<build>/ and return its manifest's URI."""
    store = open_store(store_uri)
    build_id = f"synthetic-{seed}"
    build = join_key("datasets", name, build_id)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)

    placeholder = f"placeholder tokenizer {tokenizer!r}, vocab {vocab_size}: not a SentencePiece model\n".encode()
    tokenizer_key = "tokenizer/tokenizer.model"
    store.put_bytes(join_key(build, tokenizer_key), placeholder)
    tokenizer_info = TokenizerInfo(
        key=tokenizer_key, sha256=sha256_bytes(placeholder), vocab_size=vocab_size,
        bos_id=BOS_ID, eos_id=EOS_ID, trained=False,
    )

    shards: list[TokenShard] = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, lengths in sources.items():
            part, writer = 0, None
            for length in lengths:
                if length < 1:
                    raise ValueError(f"source {source!r}: a document needs at least its EOS token")
                if writer is not None and writer.documents and writer.tokens + length > shard_tokens:
                    shards.append(_upload(store, build, source, part, writer))
                    part, writer = part + 1, None
                if writer is None:
                    writer = ShardWriter(Path(tmp) / f"{source}-{part:04d}", dtype)
                document = rng.integers(FIRST_TEXT_ID, vocab_size, size=length)
                document[-1] = EOS_ID
                writer.add_document(document)
            if writer is not None:
                shards.append(_upload(store, build, source, part, writer))

    config = {"synthetic": {"sources": sources, "vocab_size": vocab_size, "seed": seed, "shard_tokens": shard_tokens}}
    manifest, table = new_manifest(
        ShardTable.of(shards),
        SHARD_TABLE,
        name=name,
        build_id=build_id,
        config=config,
        config_hash=sha256_bytes(canonical_json(config)),
        tokenizer=tokenizer_info,
        dtype=dtype.name,
        sources={
            source: SourceAccounting(docs_in=len(lengths), kept=len(lengths), tokens=sum(lengths))
            for source, lengths in sources.items()
        },
    )
    put_manifest(store.child(build), "manifest.json", manifest, table)
    return store.url(join_key(build, "manifest.json"))


def _upload(store, build: str, source: str, part: int, writer: ShardWriter) -> TokenShard:
    writer.close()
    prefix = join_key("tokens", source, f"{source}-{part:04d}")
    build_store = store.child(build)
    bin_info = upload(build_store, f"{prefix}.bin", writer.bin_path)
    idx_info = upload(build_store, f"{prefix}.idx", writer.idx_path)
    return TokenShard(prefix=prefix, source=source, documents=writer.documents, tokens=writer.tokens, bin=bin_info, idx=idx_info)


def source_tokens(manifest_uri: str, source: str | None = None) -> np.ndarray:
    """The token stream the loader cuts into blocks: the (selected) shards in manifest order,
    read straight from the store without the loader."""
    store, key = open_object(manifest_uri)
    manifest = read_manifest(store, key)
    shards = read_shard_table(store, key, manifest)
    if source is not None:
        shards = shards.of_source(source)
    dtype = token_dtype(manifest.tokenizer.vocab_size)
    parts = [np.frombuffer(store.get_bytes(f"{prefix}.bin"), dtype) for prefix in shards.prefixes]  # tokens back to back
    return np.concatenate(parts).astype(np.int64)


def source_blocks(manifest_uri: str, seq_len: int, source: str | None = None) -> np.ndarray:
    """Every full block of seq_len + 1 tokens of a source, in stream order: int64 [blocks, seq_len + 1]."""
    tokens = source_tokens(manifest_uri, source)
    count = len(tokens) // (seq_len + 1)
    return tokens[: count * (seq_len + 1)].reshape(count, seq_len + 1)
