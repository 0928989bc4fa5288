"""The tokenize stage's encoder (tasks.piece_cache) vs raw SentencePiece, same texts, same cores.

    .venv/bin/python -m benchmarks.tokenize [--bytes 64M] [--repeats 3] [--vocab 32000] [--stage]

Generates two corpora locally (no network), each of `--bytes` of UTF-8: English-like prose
(sentences of Zipf-distributed words, capitals, punctuation, numbers, paragraphs) and
Python-like code (indented functions of Zipf-distributed identifiers, operators, literals,
comments), trains a tokenizer on a sample of both as the build trains one (BPE, byte fallback,
identity normalization), and times, on the same 8 MiB batches:
- per core: raw `SentencePieceProcessor.encode(batch, num_threads=1)` vs the stage's encoder
  (`PieceCacheEncoder.encode`, cold cache at the start of each run), in CPU seconds of a fresh
  process each (time.process_time), with that process's peak RSS over the loaded corpus;
- all cores: raw `encode(batch, num_threads=cores)` vs `cores` processes of the stage's
  encoder, one share of the batches each (the stage runs one Ray task per core), wall time.
Prints medians of `--repeats` runs, the cache hit rate and the ratio stage/raw (target: >= 1.5),
with `uptime` (other work on the machine). `--stage` also runs the stage end to end, store to
store, on the sample corpus (a full build first: slow).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import sentencepiece as spm

BATCH_BYTES = 8 << 20  # about one docs row group of ingest
LETTERS = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
LETTER_WEIGHTS = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0,
                           0.8, 0.2, 0.2, 0.1, 0.1])


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def _words(rng: np.random.Generator, count: int, low: int, high: int) -> list[str]:
    lengths = rng.integers(low, high, count)
    letters = rng.choice(LETTERS, lengths.sum(), p=LETTER_WEIGHTS / LETTER_WEIGHTS.sum())
    return ["".join(letters[end - n : end]) for n, end in zip(lengths, np.cumsum(lengths))]


def prose_corpus(target_bytes: int, seed: int = 0) -> list[str]:
    """Documents of paragraphs of sentences of Zipf-distributed pseudo-words (a 60,000-word
    vocabulary), capitalized, with commas, numbers, the odd quote, paragraphs by blank lines."""
    rng = np.random.default_rng(seed)
    vocabulary = _words(rng, 60_000, 1, 12)
    docs, size = [], 0
    while size < target_bytes:
        ids = np.minimum(rng.zipf(1.15, 400_000), len(vocabulary)) - 1
        words = [vocabulary[i] for i in ids]
        for i in np.flatnonzero(rng.random(len(words)) < 0.06):
            words[i] += ","
        for i in np.flatnonzero(rng.random(len(words)) < 0.01):
            words[i] = str(rng.integers(0, 3000))
        text, start = [], 0
        for length in rng.integers(6, 30, len(words) // 6):
            sentence = words[start : start + length]
            if not sentence:
                break
            sentence[0] = sentence[0].capitalize()
            text.append(" ".join(sentence) + rng.choice([".", ".", ".", "?", "!", '."']))
            start += length
        paragraphs = [" ".join(text[i : i + 6]) for i in range(0, len(text), 6)]
        for i in range(0, len(paragraphs), 8):
            docs.append("\n\n".join(paragraphs[i : i + 8]))
            size += len(docs[-1])
    return docs


def code_corpus(target_bytes: int, seed: int = 1) -> list[str]:
    """Documents of Python-like functions: Zipf-distributed snake_case identifiers, keywords,
    operators, calls, literals and comments, indented by four spaces per level."""
    rng = np.random.default_rng(seed)
    parts = _words(rng, 3000, 2, 8)
    identifiers = ["_".join(parts[j] for j in rng.integers(0, len(parts), rng.integers(1, 4))) for _ in range(20_000)]

    def name() -> str:
        return identifiers[min(int(rng.zipf(1.3)), len(identifiers)) - 1]

    def expression() -> str:
        kind = rng.integers(0, 6)
        if kind == 0:
            return f"{name()}({name()}, {rng.integers(0, 100)})"
        if kind == 1:
            return f"{name()}.{name()}[{rng.integers(0, 10)}]"
        if kind == 2:
            return f"{name()} {rng.choice(['+', '-', '*', '//', '%', '=='])} {name()}"
        if kind == 3:
            return f'"{name()} {name()}"'
        return name()

    docs, size = [], 0
    while size < target_bytes:
        lines = []
        for _ in range(rng.integers(2, 12)):
            lines.append(f"def {name()}({', '.join(name() for _ in range(rng.integers(0, 4)))}):")
            depth = 1
            for _ in range(rng.integers(3, 25)):
                pad = "    " * depth
                kind = rng.integers(0, 10)
                if kind < 5:
                    lines.append(f"{pad}{name()} = {expression()}")
                elif kind == 5 and depth < 4:
                    lines.append(f"{pad}{rng.choice(['if', 'while', 'for x in'])} {expression()}:")
                    depth += 1
                elif kind == 6:
                    lines.append(f"{pad}# {' '.join(name() for _ in range(rng.integers(2, 8)))}")
                elif kind == 7 and depth > 1:
                    depth -= 1
                    lines.append(f"{'    ' * depth}return {expression()}")
                else:
                    lines.append(f"{pad}{expression()}")
            lines.append("")
        docs.append("\n".join(lines))
        size += len(docs[-1])
    return docs


def batch_slices(texts: pa.Array) -> list[tuple[int, int]]:
    """[start, end) rows of batches of about BATCH_BYTES of text."""
    ends = np.cumsum(pc.binary_length(texts).to_numpy())
    cuts = np.searchsorted(ends, np.arange(BATCH_BYTES, ends[-1], BATCH_BYTES), side="right") + 1
    bounds = np.unique(np.concatenate(([0], np.minimum(cuts, len(texts)), [len(texts)])))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def encode_in_process(job: tuple[str, str, str, int, int, int]) -> dict:
    """One measured run in a fresh process: (encoder, corpus file, model file, threads, share, shares).
    Its peak is the rise of the resident set while encoding (Linux's high-water mark, reset first)."""
    encoder_name, corpus_path, model_path, threads, share, shares = job
    from tasks.piece_cache import PieceCacheEncoder

    texts = feather.read_table(corpus_path).column("text").combine_chunks()
    model = Path(model_path).read_bytes()
    slices = batch_slices(texts)[share::shares]
    if encoder_name == "raw":  # Python strings, as the stage held them before
        processor = spm.SentencePieceProcessor(model_proto=model)
        todo = [texts.slice(start, end - start).to_pylist() for start, end in slices]
        del texts
        encode = lambda batch: processor.encode(batch, num_threads=threads)  # noqa: E731
    else:  # Arrow arrays, as the stage reads them from parquet
        encoder = PieceCacheEncoder(model, num_threads=threads)
        todo = [texts.slice(start, end - start) for start, end in slices]
        encode = encoder.encode
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the high-water mark
    before = memory_kib("VmRSS")
    started_cpu, started = time.process_time(), time.perf_counter()
    for batch in todo:
        encode(batch)
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    peak = (memory_kib("VmHWM") - before) * 1024
    hit_rate = 0.0 if encoder_name == "raw" else encoder.hit_rate
    return {"cpu": cpu, "wall": wall, "peak": peak, "hit_rate": hit_rate}


def run_fresh(jobs: list[tuple]) -> list[dict]:
    """Each job in its own new process (spawned, so peaks and caches start clean), all at once."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(jobs), maxtasksperchild=1) as pool:
        return pool.map(encode_in_process, jobs, chunksize=1)


def train_tokenizer(corpora: dict[str, list[str]], vocab_size: int, sample_bytes: int) -> bytes:
    from tasks.config import TokenizerTrain
    from tasks.tokenizer import train_model

    lines = []
    for texts in corpora.values():
        taken = 0
        for text in texts:
            lines += [line for line in text.splitlines() if line.strip()]
            taken += len(text)
            if taken >= sample_bytes // len(corpora):
                break
    return train_model(iter(lines), TokenizerTrain(vocab_size=vocab_size, sample_bytes=sample_bytes))


def encoder_table(args: argparse.Namespace, work: Path) -> None:
    corpora = {"prose": prose_corpus(args.bytes), "code": code_corpus(args.bytes)}
    model_path = work / "tokenizer.model"
    model_path.write_bytes(train_tokenizer(corpora, args.vocab, args.train_bytes))
    vocab = spm.SentencePieceProcessor(model_file=str(model_path)).vocab_size()
    cores = os.cpu_count() or 1
    print(f"\ntokenizer: BPE as the build trains it, vocab {vocab}; {cores} cores; medians of {args.repeats} runs")
    print(f"load before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\n")
    print("| corpus | MB | encoder | CPU s (1 thread) | MB/CPU-s | vs raw | peak RSS MiB | hit rate "
          f"| wall s, {cores} cores | vs raw |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, texts in corpora.items():
        path = work / f"{name}.feather"
        feather.write_feather(pa.table({"text": pa.array(texts, pa.large_string())}), path)
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        one, many = {}, {}
        for encoder in ("raw", "stage"):
            one[encoder] = [run_fresh([(encoder, str(path), str(model_path), 1, 0, 1)])[0] for _ in range(args.repeats)]
            if encoder == "raw":
                many[encoder] = [run_fresh([(encoder, str(path), str(model_path), cores, 0, 1)])[0]["wall"] for _ in range(args.repeats)]
            else:  # one process per core, as the stage runs; the slowest share is the wall time
                jobs = [(encoder, str(path), str(model_path), 1, share, cores) for share in range(cores)]
                many[encoder] = [max(r["wall"] for r in run_fresh(jobs)) for _ in range(args.repeats)]
        raw_cpu = statistics.median(r["cpu"] for r in one["raw"])
        raw_wall = statistics.median(many["raw"])
        for encoder in ("raw", "stage"):
            cpu = statistics.median(r["cpu"] for r in one[encoder])
            peak = statistics.median(r["peak"] for r in one[encoder]) / 2**20
            hits = statistics.median(r["hit_rate"] for r in one[encoder])
            wall = statistics.median(many[encoder])
            label = "raw SentencePiece encode" if encoder == "raw" else "stage encoder (piece cache)"
            print(f"| {name} | {megabytes:.0f} | {label} | {cpu:.1f} | {megabytes / cpu:.2f} | {raw_cpu / cpu:.2f} | {peak:.0f} "
                  f"| {hits:.3f} | {wall:.1f} | {raw_wall / wall:.2f} |")
    print(f"\nload after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


def stage_vs_raw(args: argparse.Namespace, work: Path) -> None:
    """The tokenize stage end to end, store to store, vs raw encode over the same kept texts in memory."""
    from deployments.settings import configure_prefect

    configure_prefect(work)  # before prefect is imported: the flow runs on a temporary server
    import ray
    import yaml

    from flows.build_dataset import build_dataset
    from storage import build_layout as layout
    from storage.manifest import TokenizerInfo, read_record
    from tasks.config import BuildConfig
    from tasks.fanout import ensure_ray, run_stage
    from tasks.parquet_io import read_table
    from tasks.plan import Build, shard_of
    from tasks.removals import deduplicated_ids
    from demo.sample_corpus import make_sample_corpus
    from tasks.stage import Stage
    from tasks.tokenize import CACHE_SHARE, tokenize_shard

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
    for _ in range(args.repeats):
        started = time.perf_counter()
        for i in range(0, len(texts), 1024):
            processor.encode(texts[i : i + 1024], num_threads=cores)
        raw.append(megabytes / (time.perf_counter() - started))
        for key in list(store.list(layout.receipts("tokenize"))):
            store.delete(key)
        started = time.perf_counter()
        cache_bytes = config.task_memory_bytes // CACHE_SHARE
        work_item = lambda f: tokenize_shard(store, f, tokenizer, config.documents, config.shard_tokens, config.seed, cache_bytes)  # noqa: E731
        run_stage(store, Stage("tokenize", plan, shard_of, work_item, (layout.TOKENS,)))
        stage.append(megabytes / (time.perf_counter() - started))
    raw_mb, stage_mb = statistics.median(raw), statistics.median(stage)
    print(f"\n{megabytes:.1f} MB of kept text in {len(plan)} docs shards, {cores} cores, vocab {tokenizer.vocab_size}, "
          f"medians of {args.repeats}\n")
    print("| encoder | MB/s | vs raw |\n| --- | ---: | ---: |")
    print(f"| raw SentencePiece encode (batched, {cores} threads) | {raw_mb:.2f} | 1.00 |")
    print(f"| tokenize + pack stage, store to store ({cores} Ray workers) | {stage_mb:.2f} | {stage_mb / raw_mb:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_bytes, default=parse_bytes("64M"), help="of each corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--train-bytes", type=parse_bytes, default=parse_bytes("8M"), help="of text the tokenizer trains on")
    parser.add_argument("--stage", action="store_true", help="also the stage end to end on the sample corpus (a full build)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    encoder_table(args, work)
    if args.stage:
        stage_vs_raw(args, work)
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
