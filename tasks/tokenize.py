"""Stage 6: tokenize and pack.

Per docs shard (one Ray task each): read the shard a row group at a time, drop the ids dedup
removed, encode the batch (`tasks.piece_cache`: SentencePiece's ids through a cache of
whitespace-delimited chunks) and spill the ids to a local file; then shuffle the documents
with a seed of (build seed, shard), frame each by the build's document convention (BOS first
unless the build turns it off, EOS last; no BOS padding), and write Megatron `.bin/.idx`
shards of about `shard_tokens` tokens, one sequence per document. A task holds one batch of
text, the piece cache and one int64 per document, never the whole shard. A document is never
split and nothing is dropped at a shard's end; training blocks are cut by the loader at read time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import build_layout as layout
from storage.manifest import DocumentConvention, ShardResult, SourceAccounting, TokenizerInfo, TokenShard, upload
from storage.shards import ShardWriter, token_dtype
from storage.store import Store
from tasks.piece_cache import PieceCacheEncoder
from tasks.plan import Build, PlannedFile, shard_of
from tasks.removals import deduplicated_ids
from tasks.stage import TOKENIZE, Stage, stage_task
from tasks.step_result import StepResult, StepRun
from tasks.stage_counts import TokenizeCounts
from tasks.tokenizer import cached_processor

CACHE_SHARE = 4  # the piece cache holds at most task_memory_bytes / CACHE_SHARE


@lru_cache(maxsize=2)
def cached_encoder(uri: str, sha256: str, cache_bytes: int) -> PieceCacheEncoder:
    """One encoder per worker process and tokenizer: its piece cache lives on across shards."""
    return PieceCacheEncoder(cached_processor(uri, sha256).serialized_model_proto(), cache_bytes, name=uri)


def _kept_texts(store: Store, file: PlannedFile, folder: Path) -> Iterator[pa.Array]:
    """The texts of the docs shard that dedup kept, in file order, a row group at a time
    (ingest writes one per ~8 MiB of text or 2048 documents)."""
    key = layout.docs(file.source, file.shard)
    docs = pq.ParquetFile(store.local_path(key) or store.download(key, folder / "docs.parquet"))
    removed = deduplicated_ids(store, file)
    for group in range(docs.num_row_groups):
        batch = docs.read_row_group(group, columns=["id", "text"])
        kept = ~np.isin(batch.column("id").to_numpy(), removed)
        yield batch.column("text").combine_chunks().filter(pa.array(kept))


def _frame_parts(convention: DocumentConvention, tokenizer: TokenizerInfo) -> tuple[np.ndarray, np.ndarray]:
    """What `convention.frame` puts before and after a document's ids, as arrays (framing a
    document by list costs more than encoding it). int64: the writer checks the range."""
    marker = object()
    framed = convention.frame([marker], tokenizer)
    cut = framed.index(marker)
    return np.array(framed[:cut], np.int64), np.array(framed[cut + 1 :], np.int64)


def _upload(store: Store, writer: ShardWriter, prefix: str, file: PlannedFile) -> TokenShard:
    # the index last: a reader finds the .idx only when the .bin is there
    bin_info = upload(store, f"{prefix}.bin", writer.bin_path)
    idx_info = upload(store, f"{prefix}.idx", writer.idx_path)
    return TokenShard(
        prefix=prefix, source=file.source, documents=writer.documents, tokens=writer.tokens, bin=bin_info, idx=idx_info
    )


def tokenize_shard(
    store: Store,
    file: PlannedFile,
    tokenizer: TokenizerInfo,
    convention: DocumentConvention,
    shard_tokens: int,
    seed: int,
    cache_bytes: int,
) -> ShardResult:
    encoder = cached_encoder(store.url(tokenizer.key), tokenizer.sha256, cache_bytes)
    dtype = token_dtype(tokenizer.vocab_size)
    shards: list[TokenShard] = []
    with tempfile.TemporaryDirectory() as tmp:
        spill, batch_lengths = Path(tmp) / "ids", [np.empty(0, np.int64)]
        with spill.open("wb") as out:
            for texts in _kept_texts(store, file, Path(tmp)):
                ids, lengths = encoder.encode(texts)
                ids.astype(dtype).tofile(out)
                batch_lengths.append(lengths)
        lengths = np.concatenate(batch_lengths)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        # a plain view of the map (a memmap slice costs more than the document); mmap refuses an empty file
        ids = np.memmap(spill, dtype, mode="r").view(np.ndarray) if lengths.sum() else np.empty(0, dtype)
        head, tail = _frame_parts(convention, tokenizer)
        writer = ShardWriter(Path(tmp) / "part-0", dtype)
        for doc in np.random.default_rng([seed, file.ordinal]).permutation(len(ends)).tolist():
            framed = np.concatenate((head, ids[starts[doc] : ends[doc]], tail))
            if writer.documents and writer.tokens + len(framed) > shard_tokens:
                writer.close()
                shards.append(_upload(store, writer, layout.tokens(file.source, file.shard, len(shards)), file))
                writer = ShardWriter(Path(tmp) / f"part-{len(shards)}", dtype)
            writer.add_document(framed)
        writer.close()
        if writer.documents:
            shards.append(_upload(store, writer, layout.tokens(file.source, file.shard, len(shards)), file))
    outputs = [info for shard in shards for info in (shard.bin, shard.idx)]
    documents, tokens = sum(s.documents for s in shards), sum(s.tokens for s in shards)
    return ShardResult(
        outputs=outputs,
        counts=TokenizeCounts(documents=documents, tokens=tokens),
        sources={file.source: SourceAccounting(kept=documents, tokens=tokens)},
        token_shards=shards,
    )


@stage_task(TOKENIZE)
def tokenize(build: Build, tokenizer: TokenizerInfo) -> StepResult:
    store, config = build.store, build.config
    cache_bytes = config.task_memory_bytes // CACHE_SHARE
    stage = Stage(
        TOKENIZE, build.plan, shard_of,
        lambda f: tokenize_shard(store, f, tokenizer, config.documents, config.shard_tokens, config.seed, cache_bytes),
        (layout.TOKENS,),
    )
    run = StepRun(TOKENIZE, store, config)
    run(stage)
    return run.result()
