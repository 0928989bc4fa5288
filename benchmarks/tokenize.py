"""Tokenize + pack stage vs the raw SentencePiece encoder, same documents, same cores.

    .venv/bin/python -m benchmarks.tokenize [--bytes 64M] [--repeats 3]

Builds the sample corpus and runs the build flow up to the tokenizer once (a local store,
local Ray with every core), then times, on the same kept documents:
- raw: `SentencePieceProcessor.encode(batch, num_threads=<cores>)` over texts already in memory;
- stage: the project's tokenize stage end to end, store to store (read docs parquet, skip dedup
  removals, shuffle, encode, write Megatron shards, upload, verify, receipts), one Ray task per shard.
Prints medians (MB/s of UTF-8 text) and the ratio stage/raw. Target: >= 0.85.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import yaml

from deployments.settings import configure_prefect


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_bytes, default=parse_bytes("64M"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    configure_prefect(work)  # before prefect is imported: the flow runs on a temporary server

    import ray

    from flows.build_dataset import build_dataset
    from storage import build_layout as layout
    from storage.manifest import TokenizerInfo, read_record
    from tasks.config import BuildConfig
    from tasks.fanout import ensure_ray, run_stage
    from tasks.parquet_io import read_table
    from tasks.plan import Build
    from tasks.removals import deduplicated_ids
    from tasks.sample_corpus import make_sample_corpus
    from tasks.stage import Stage
    from tasks.plan import shard_of
    from tasks.tokenize import tokenize_shard

    corpus = make_sample_corpus(work / "raw", target_bytes=args.bytes)
    config = BuildConfig.model_validate({**yaml.safe_load(Path(corpus["config"]).read_text()), "output": str(work / "out")})
    build_dataset(config)  # a full build: docs shards, dedup removals and the tokenizer are in place
    build = Build(config=config)
    store, plan = build.store, build.plan
    tokenizer = read_record(store, layout.TOKENIZER_INFO, TokenizerInfo)
    processor = spm.SentencePieceProcessor(model_proto=store.get_bytes(tokenizer.key))

    texts = []
    for file in plan:
        docs = read_table(store, layout.docs(file.source, file.shard), columns=["id", "text"])
        removed = set(deduplicated_ids(store, file).tolist())
        texts += [t for i, t in zip(docs.column("id").to_pylist(), docs.column("text").to_pylist()) if i not in removed]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ensure_ray()
    cores = int(ray.cluster_resources()["CPU"])

    raw, stage = [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        for i in range(0, len(texts), 1024):
            processor.encode(texts[i : i + 1024], num_threads=cores)
        raw.append(megabytes / (time.perf_counter() - started))

        for key in list(store.list(layout.receipts("tokenize"))):
            store.delete(key)
        started = time.perf_counter()
        work = lambda f: tokenize_shard(store, f, tokenizer, config.documents, config.shard_tokens, config.seed)  # noqa: E731
        run_stage(store, Stage("tokenize", plan, shard_of, work, (layout.TOKENS,)))
        stage.append(megabytes / (time.perf_counter() - started))

    raw_mb, stage_mb = statistics.median(raw), statistics.median(stage)
    print(f"\n{megabytes:.1f} MB of kept text in {len(plan)} docs shards, {cores} cores, vocab {tokenizer.vocab_size}, "
          f"medians of {args.repeats}\n")
    print("| encoder | MB/s | vs raw |\n| --- | ---: | ---: |")
    print(f"| raw SentencePiece encode (batched, {cores} threads) | {raw_mb:.2f} | 1.00 |")
    print(f"| tokenize + pack stage, store to store ({cores} Ray workers) | {stage_mb:.2f} | {stage_mb / raw_mb:.2f} |")
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
