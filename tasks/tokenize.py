"""Stage 6: tokenize and pack.

Per docs shard (one Ray task each): drop the ids dedup removed, shuffle the rest with a seed
of (build seed, shard), encode whole documents in batches, frame each by the build's document
convention (BOS first unless the build turns it off, EOS last; no BOS padding), and write
Megatron `.bin/.idx` shards of about `shard_tokens` tokens, one sequence per document.
A document is never split and nothing is dropped at a shard's end; training blocks are cut
by the loader at read time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from storage import build_layout as layout
from storage.manifest import DocumentConvention, ShardResult, SourceAccounting, TokenizerInfo, TokenShard, upload
from storage.shards import ShardWriter, token_dtype
from storage.store import Store
from tasks.fanout import run_stage
from tasks.parquet_io import read_table
from tasks.plan import Build, PlannedFile, shard_of
from tasks.removals import deduplicated_ids
from tasks.reporting import stage_totals
from tasks.stage import Stage, stage_task
from tasks.tokenizer import cached_processor

ENCODE_BATCH_BYTES = 8 << 20


def _batches(texts: list[str], order: np.ndarray):
    batch, size = [], 0
    for i in order:
        batch.append(texts[i])
        size += len(texts[i])
        if size >= ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _upload(store: Store, writer: ShardWriter, prefix: str, file: PlannedFile) -> TokenShard:
    # the index last: a reader finds the .idx only when the .bin is there
    bin_info = upload(store, f"{prefix}.bin", writer.bin_path)
    idx_info = upload(store, f"{prefix}.idx", writer.idx_path)
    return TokenShard(
        prefix=prefix, source=file.source, documents=writer.documents, tokens=writer.tokens, bin=bin_info, idx=idx_info
    )


def tokenize_shard(
    store: Store, file: PlannedFile, tokenizer: TokenizerInfo, convention: DocumentConvention, shard_tokens: int, seed: int
) -> ShardResult:
    processor = cached_processor(store.url(tokenizer.key), tokenizer.sha256)
    docs = read_table(store, layout.docs(file.source, file.shard), columns=["id", "text"])
    keep = np.flatnonzero(~np.isin(docs.column("id").to_numpy(), deduplicated_ids(store, file)))
    texts = docs.column("text").to_pylist()
    order = keep[np.random.default_rng([seed, file.ordinal]).permutation(len(keep))]
    dtype = token_dtype(tokenizer.vocab_size)
    shards: list[TokenShard] = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp) / "part-0", dtype)
        for batch in _batches(texts, order):
            for ids in processor.encode(batch, num_threads=1):
                ids = convention.frame(ids, tokenizer)
                if writer.documents and writer.tokens + len(ids) > shard_tokens:
                    writer.close()
                    shards.append(_upload(store, writer, layout.tokens(file.source, file.shard, len(shards)), file))
                    writer = ShardWriter(Path(tmp) / f"part-{len(shards)}", dtype)
                writer.add_document(ids)
        writer.close()
        if writer.documents:
            shards.append(_upload(store, writer, layout.tokens(file.source, file.shard, len(shards)), file))
    outputs = [info for shard in shards for info in (shard.bin, shard.idx)]
    documents, tokens = sum(s.documents for s in shards), sum(s.tokens for s in shards)
    return ShardResult(
        outputs=outputs,
        counts={"documents": documents, "tokens": tokens},
        sources={file.source: SourceAccounting(kept=documents, tokens=tokens)},
        token_shards=shards,
    )


@stage_task("tokenize")
def tokenize(build: Build, tokenizer: TokenizerInfo) -> dict[str, int | float]:
    store, config = build.store, build.config
    stage = Stage(
        "tokenize", build.plan, shard_of,
        lambda f: tokenize_shard(store, f, tokenizer, config.documents, config.shard_tokens, config.seed),
        (layout.TOKENS,),
    )
    return stage_totals(run_stage(store, stage, config, config.parallelism).receipts)
