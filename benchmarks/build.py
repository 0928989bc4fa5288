"""The whole build-dataset flow beside datatrove's equivalent pipeline: MB/s of raw text per core.

    .venv/bin/python -m benchmarks.build [--bytes 1G] [--repeats 3] [--no-datatrove]

Makes the sample corpus (demo/sample_corpus.py: SlimPajama-style prose as jsonl.zst, 70% of
the bytes, and Starcoder-style code as parquet) and trains one SentencePiece model on a sample
of it (as the build trains one), before any clock. Then, `--repeats` times, taking turns:
- project: the build-dataset flow on local Ray with every core into a fresh local folder:
  ingest, exact dedup, near dedup (MinHash, char 13-grams x 128, 16 x 8 bands, verified),
  tokenize + pack with that model (config `tokenizer.model`, so nothing is trained), manifest.
  Ray and the Prefect server are started before the clock, as long-lived services are in
  production. Each stage's time is the wall time of its Prefect task's body; Prefect's own
  overhead is the flow's wall time minus the stage bodies.
- datatrove (the `bench` extra: datatrove==0.10.1, spacy for its word tokenizer): the same
  pipeline as its blocks on LocalPipelineExecutor, as many workers as cores, one task per
  input file: JsonlReader + ParquetReader (RedPajamaGithub excluded, as the config excludes
  it) -> ExactDedupSignature | ExactFindDedups | readers -> ExactDedupFilter ->
  MinhashDedupSignature (its defaults: word 5-grams, 14 x 8) | MinhashDedupBuckets |
  MinhashDedupCluster | readers -> ExactDedupFilter -> MinhashDedupFilter -> DocumentTokenizer,
  with the same SentencePiece model converted to a `tokenizers` tokenizer.json
  (model.hf.fast_tokenizer: the same ids) and the project's document convention (BOS text EOS).
  Each block's time is the wall time of its executor's run.
Prints the median of the repeats per stage, MB/s per core = raw MB / (wall s x cores), the
speed-up over datatrove (the median of the runs' datatrove wall / project wall), and the
machine's load (other work on it slows both).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import yaml
import zstandard

from benchmarks.tokenize import parse_bytes
from deployments.settings import configure_prefect

EXCLUDED_SET = "RedPajamaGithub"
TOKENIZER_SAMPLE_BYTES = 16 << 20
STAGES = ("plan", "ingest", "exact_dedup", "near_dedup", "tokenizer", "tokenize", "write_manifest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=parse_bytes, default=parse_bytes("1G"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-datatrove", action="store_true", help="only the project's build")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    configure_prefect(work)  # before prefect is imported: the flow runs on a temporary server

    import ray
    from prefect import flow

    import flows.build_dataset as flow_module
    from tasks.config import BuildConfig
    from tasks.fanout import ensure_ray
    from demo.sample_corpus import make_sample_corpus

    started = time.perf_counter()
    corpus = make_sample_corpus(work / "raw", target_bytes=args.bytes)
    print(f"made the corpus in {time.perf_counter() - started:.0f} s: {corpus['documents']}")
    raw_bytes = sum(s["bytes"] for s in corpus["sources"].values())
    root = Path(corpus["root"])
    tokenizer_model = work / "tokenizer.model"
    tokenizer_model.write_bytes(train_tokenizer(root))
    config = {**yaml.safe_load(Path(corpus["config"]).read_text()), "tokenizer": {"model": str(tokenizer_model)}}

    stage_seconds: dict[str, list[float]] = {}
    time_stages(flow_module, stage_seconds)
    # Ray and the Prefect server start before the clock: long-lived services are the normal case.
    ensure_ray()
    cores = int(ray.cluster_resources()["CPU"])
    flow(name="warm-up")(lambda: None)()

    runs: dict[str, list[float]] = {"project": [], "datatrove": []}
    datatrove_blocks: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    loads = []
    for repeat in range(args.repeats):
        loads.append(os.getloadavg()[0])
        out = work / f"out-{repeat}"
        build = BuildConfig.model_validate({**config, "output": str(out)})
        started = time.perf_counter()
        manifest_uri = flow_module.build_dataset(build)
        runs["project"].append(time.perf_counter() - started)
        tokens["project"] = manifest_tokens(manifest_uri)
        shutil.rmtree(out)
        stages = ", ".join(f"{name} {times[-1]:.1f}" for name, times in stage_seconds.items())
        print(f"run {repeat + 1}: project {runs['project'][-1]:.1f} s (load {loads[-1]:.1f}): {stages}", flush=True)
        if not args.no_datatrove:
            out = work / f"datatrove-{repeat}"
            seconds, tokens["datatrove"] = run_datatrove(root, tokenizer_model, out, cores, datatrove_blocks)
            runs["datatrove"].append(seconds)
            shutil.rmtree(out)
            blocks = ", ".join(f"{name} {times[-1]:.1f}" for name, times in datatrove_blocks.items())
            print(f"run {repeat + 1}: datatrove {runs['datatrove'][-1]:.1f} s (load {os.getloadavg()[0]:.1f}): {blocks}", flush=True)
    loads.append(os.getloadavg()[0])

    megabytes = raw_bytes / 1e6
    print(f"\n{megabytes:.0f} MB raw text, {cores} cores, medians of {args.repeats} runs, "
          f"1-minute load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n")
    wall = statistics.median(runs["project"])
    print("| project stage | seconds | share of flow |\n| --- | ---: | ---: |")
    work_s = 0.0
    for name, seconds in stage_seconds.items():
        median = statistics.median(seconds)
        work_s += median
        print(f"| {name} | {median:.1f} | {median / wall:.1%} |")
    print(f"| Prefect overhead (flow wall - stage bodies) | {wall - work_s:.1f} | {(wall - work_s) / wall:.1%} |")
    print(f"| **flow wall time** | {wall:.1f} | 100% |")
    if datatrove_blocks:
        total = statistics.median(runs["datatrove"])
        print("\n| datatrove block | seconds | share |\n| --- | ---: | ---: |")
        for name, seconds in datatrove_blocks.items():
            print(f"| {name} | {statistics.median(seconds):.1f} | {statistics.median(seconds) / total:.1%} |")
        print(f"| **wall time** | {total:.1f} | 100% |")

    print(f"\n| pipeline ({megabytes:.0f} MB, {cores} cores) | wall s (runs) | MB/s | MB/s per core | tokens | vs datatrove |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, walls in runs.items():
        if not walls:
            continue
        median = statistics.median(walls)
        # the median of the ratios within a run: both pipelines of a run saw about the same load
        ratio = f"{statistics.median(d / w for d, w in zip(runs['datatrove'], walls)):.2f}x" if runs["datatrove"] else "-"
        listed = ", ".join(f"{w:.0f}" for w in walls)
        print(f"| {name} | {median:.1f} ({listed}) | {megabytes / median:.2f} | {megabytes / median / cores:.2f} | {tokens[name]:,} | {ratio} |")


def corpus_texts(root: Path, limit_per_file: int):
    """The corpus's texts, about the first `limit_per_file` bytes of each file, excluded ones left out."""
    for path in sorted(root.glob("slimpajama/*.jsonl.zst")):
        size = 0
        with zstandard.open(path, "rb") as lines:
            for line in io.BufferedReader(lines):
                record = orjson.loads(line)
                if record["meta"]["redpajama_set_name"] != EXCLUDED_SET:
                    yield record["text"]
                    size += len(record["text"])
                    if size >= limit_per_file:
                        break
    for path in sorted(root.glob("starcoder/*.parquet")):
        size = 0
        for text in pq.read_table(path, columns=["content"]).column("content").to_pylist():
            yield text
            size += len(text)
            if size >= limit_per_file:
                break


def train_tokenizer(root: Path) -> bytes:
    """A SentencePiece model trained as the build trains one, on about TOKENIZER_SAMPLE_BYTES of the corpus."""
    from tasks.config import TokenizerTrain
    from tasks.tokenizer import train_model

    files = len(list(root.glob("*/*")))
    lines = (line for text in corpus_texts(root, TOKENIZER_SAMPLE_BYTES // files) for line in text.splitlines() if line)
    return train_model(lines, TokenizerTrain(vocab_size=4096))


def manifest_tokens(manifest_uri: str) -> int:
    manifest = orjson.loads(Path(manifest_uri.removeprefix("file://")).read_bytes())
    return manifest["total_tokens"]


def time_stages(flow_module, seconds: dict[str, list[float]]) -> None:
    """Wrap the body of every stage task of the build flow to append its wall time, by task
    name, to `seconds`."""
    for name in STAGES:
        stage = getattr(flow_module, name)
        stage.fn = _timed(stage.fn, stage.name, seconds)


def _timed(fn, name: str, seconds: dict[str, list[float]]):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.setdefault(name, []).append(time.perf_counter() - started)

    return timed


# -- datatrove --------------------------------------------------------------------------------


def document_text(document) -> str:
    return document.text


def not_excluded(document) -> bool:
    return document.metadata.get("meta", {}).get("redpajama_set_name") != EXCLUDED_SET


def hf_tokenizer(model_path: Path, out: Path) -> Path:
    """The SentencePiece model as a tokenizer.json that encodes to the same ids, with the
    project's document convention: BOS, the text, EOS."""
    import sentencepiece as spm
    from tokenizers import processors

    from model.hf import fast_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokenizer = fast_tokenizer(sp, bos=False)
    bos, eos = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, sp.bos_id()), (eos, sp.eos_id())]
    )
    path = out / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def run_datatrove(root: Path, model_path: Path, out: Path, cores: int, blocks: dict[str, list[float]]) -> tuple[float, int]:
    """datatrove's read -> exact dedup -> MinHash dedup -> tokenize on the corpus; the wall
    seconds and the tokens written. Each block's seconds are appended to `blocks`."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import JsonlReader, ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    from benchmarks import datatrove_compat

    out.mkdir(parents=True)
    tokenizer_json = hf_tokenizer(model_path, out)
    files = max(len(list(root.glob("slimpajama/*"))), len(list(root.glob("starcoder/*"))))
    exact = ExactDedupConfig(content_getter=document_text)
    minhash = MinhashConfig()

    def read():
        return [
            JsonlReader(str(root / "slimpajama"), glob_pattern="*.jsonl.zst"),
            LambdaFilter(not_excluded),
            ParquetReader(str(root / "starcoder"), text_key="content", glob_pattern="*.parquet"),
        ]

    def exact_signature():
        step = ExactDedupSignature(output_folder=str(out / "exact-sigs"), config=exact)
        step.hash_fc = datatrove_compat.xxhash64
        return step

    def minhash_signature():
        step = MinhashDedupSignature(output_folder=str(out / "minhash-sigs"), config=minhash)
        step._hash_func = datatrove_compat.xxhash64
        return step

    def exact_filter():
        return ExactDedupFilter(data_folder=str(out / "exact-dups"), config=exact)

    def executor(name: str, pipeline: list, tasks: int) -> tuple[str, LocalPipelineExecutor]:
        logs = str(out / "logs" / name)
        return name, LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(cores, tasks), logging_dir=logs)

    stages = [
        executor("exact signatures", [*read(), exact_signature()], files),
        executor("exact find", [ExactFindDedups(str(out / "exact-sigs"), str(out / "exact-dups"), config=exact)], 1),
        executor("exact filter + MinHash signatures", [*read(), exact_filter(), minhash_signature()], files),
        executor("MinHash buckets", [MinhashDedupBuckets(str(out / "minhash-sigs"), str(out / "buckets"), config=minhash)], minhash.num_buckets),
        executor("MinHash cluster", [MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=minhash)], 1),
        executor(
            "filters + tokenize",
            [*read(), exact_filter(), MinhashDedupFilter(str(out / "remove")),
             DocumentTokenizer(str(out / "tokens"), tokenizer_name_or_path=str(tokenizer_json), seed=42)],
            files,
        ),
    ]
    started = time.perf_counter()
    for name, stage in stages:
        stage_started = time.perf_counter()
        stage.run()
        blocks.setdefault(name, []).append(time.perf_counter() - stage_started)
    seconds = time.perf_counter() - started
    written = sum(path.stat().st_size for path in (out / "tokens").glob("*.ds")) // 2  # uint16 tokens
    return seconds, written


if __name__ == "__main__":
    main()
