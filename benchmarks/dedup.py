"""Near dedup: signature throughput against datatrove and datasketch, precision and recall
against exact all-pairs Jaccard, and the whole stage's wall time and per-task peak memory.

    .venv/bin/python -m benchmarks.dedup [--sample 20000] [--scales 10000,100000] [--cpus 2]
    .venv/bin/python -m benchmarks.dedup --signatures-only [--sample 4000]
    .venv/bin/python -m benchmarks.dedup --verify-requests [--sample 20000] [--budgets 1M,2M,4M,8M] [--shard-docs 50]

Benchmark-only packages, the `bench` extra: datatrove==0.10.1 (its English word tokenizer
needs spacy==3.8.18), datasketch==2.0.0 and rensa==0.5.0 (--signatures-only needs only the
last two).

1. Documents: the standard library's Python sources cut at line boundaries into documents
   of 200-3000 characters (code and docstrings, like Starcoder/SlimPajama text), a quarter
   of them replaced by edited copies of earlier ones (a random 0-20% of words replaced), so
   that near-duplicates exist at every similarity.
2. Throughput, one process, the same documents for all, in CPU seconds (process time: other
   processes sharing the machine slow the wall clock, not this), the median of 3 rounds
   with the implementations taking turns chunk by chunk:
   - the project (char 13-grams x 128, SlimPajama's recipe; and word 5-grams x 112,
     datatrove's default shape), signatures plus band hashes;
   - rensa RMinHash(num_perm=128) and datasketch MinHash(num_perm=128), each fed the same
     char 13-gram shingles (the project's `normalize`, then every 13-character slice);
   - datatrove's MinhashDedupSignature (get_shingles + get_signature, its defaults: word
     5-grams, 14 x 8 hashes, xxhash64).
   The project's numba kernels are compiled (or loaded from numba's cache) before the clock;
   what that costs a fresh process, cold and from the cache, is printed with the table.
3. Truth: every pair with Jaccard >= 0.8 over character 13-gram sets (shingles hashed with
   xxh3 in plain Python, independent of the project's hashing), found exactly by prefix
   filtering (Bayardo et al. 2007: a pair with J >= t shares one of the |A| - ceil(t|A|) + 1
   rarest shingles of each side, so none is missed). A document should be removed when a
   smaller id lies in its connected component of that graph. Precision and recall are over
   removed documents, every method keeping the smallest id of each of its clusters.
4. Scale: the whole stage on Ray (`--cpus` workers) over synthetic Zipf-word documents with
   20% planted near-duplicates; wall time and the largest per-task peak RSS (VmHWM reset
   at each task's start), with partitions sized from the documents as the build sizes them
   (tasks.partitioning, 1 GiB per task).
5. Verify requests (`--verify-requests`): the stage in-process on a local store that counts its
   reads (one per S3 GET), on `--sample` Zipf-word documents in small docs shards, at each of
   `--budgets`; the range reads of the verify path (candidates, shingles and their merge levels under runs/)
   against data / budget, with the fitted exponent (benchmarks.scale_model's least squares).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash
from pydantic import create_model

from benchmarks import datatrove_compat
from benchmarks.tokenize import parse_bytes
from storage import build_layout as layout
from storage.manifest import Counts, ShardResult
from storage.store import LocalStore, Store
from tasks.config import TASK_MEMORY_BYTES, MinHashConfig
from tasks.fanout import run_stage
from tasks.near_dedup.minhash import MinHasher, normalize
from tasks.near_dedup.steps import DocsShard, bands_rows, run_near_dedup
from tasks.parquet_io import write_table
from tasks.removals import removed_pairs
from tasks.partitioning import NEAR_BAND_ROW_BYTES, NEAR_EDGE_BYTES, batch_bytes, partitions
from tasks.plan import PlannedFile, document_id, ordinal_of
from tasks.stage import Stage

THRESHOLD = 0.8
DATATROVE = "datatrove MinhashDedupSignature, word 5-grams x 112"
DATASKETCH = "datasketch MinHash, char 13-grams x 128"
RENSA = "rensa RMinHash, char 13-grams x 128"
PROJECT_CHARS = "project, char 13-grams x 128"
UNSIGNED = np.iinfo(np.uint64).max  # a signature row datatrove did not compute
DOCS_PER_SHARD = 10_000


# -- corpora ------------------------------------------------------------------------------


def edit_copy(rng: random.Random, words: list[str], fraction: float, vocabulary: Sequence[str]) -> str:
    copy = list(words)
    for position in rng.sample(range(len(copy)), int(fraction * len(copy))):
        copy[position] = rng.choice(vocabulary)
    return " ".join(copy)


def code_corpus(count: int, seed: int = 0) -> list[str]:
    """Standard-library sources cut into documents, a quarter of them edited copies."""
    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    files = [f for f in files if "site-packages" not in f.parts]
    texts: list[str] = []
    for path in files:
        lines = path.read_text(errors="replace").splitlines(keepends=True)
        start = 0
        while start < len(lines) and len(texts) < count:
            size, end = rng.randint(200, 3000), start
            while end < len(lines) and sum(len(line) for line in lines[start:end]) < size:
                end += 1
            text = "".join(lines[start:end])
            if len(text.strip()) > 50:
                texts.append(text)
            start = end
        if len(texts) >= count:
            break
    vocabulary = sorted({w for t in texts[:2000] for w in t.split()})
    for i in range(len(texts)):
        if i > 0 and rng.random() < 0.25:
            original = texts[rng.randrange(i)].split(" ")
            texts[i] = edit_copy(rng, original, rng.uniform(0.0, 0.2), vocabulary)
    return texts


def zipf_corpus(count: int, seed: int = 0, log_words: float = 5.2) -> list[str]:
    """Synthetic documents of Zipf-distributed pseudo-words, 20% edited copies; the words per
    document are lognormal around e**log_words (181 words, ~1.5 KB, by default)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(50_000)]
    lengths = np.clip(rng.lognormal(log_words, 0.6, count).astype(int), 20, 2000)
    word_ids = np.minimum(rng.zipf(1.2, lengths.sum()), len(vocabulary)) - 1
    texts, start = [], 0
    for length in lengths:
        texts.append(" ".join(vocabulary[w] for w in word_ids[start : start + length]))
        start += length
    copy_of = rng.integers(0, np.arange(1, count))  # an earlier document
    is_copy = rng.random(count - 1) < 0.2
    edit = random.Random(seed)
    for i in np.flatnonzero(is_copy) + 1:
        texts[i] = edit_copy(edit, texts[copy_of[i - 1]].split(" "), edit.uniform(0.0, 0.15), vocabulary[:5000])
    return texts


def write_shards(store: Store, texts: Sequence[str], first_ordinal: int = 0, per_shard: int = DOCS_PER_SHARD) -> list[DocsShard]:
    """Docs shards of `per_shard` texts, plan ordinals from `first_ordinal` on."""
    shards = []
    for offset, start in enumerate(range(0, len(texts), per_shard)):
        ordinal = first_ordinal + offset
        chunk = texts[start : start + per_shard]
        file = PlannedFile(source="bench", uri=f"bench://{ordinal}", size=0, ordinal=ordinal)
        ids = pa.array([document_id(ordinal, r) for r in range(len(chunk))], pa.int64())
        key = f"docs/bench/{file.shard}.parquet"
        info = write_table(store, key, pa.table({"id": ids, "source": ["bench"] * len(chunk), "text": list(chunk), "meta": ["{}"] * len(chunk)}))
        shards.append(DocsShard(file, key, size=info.size))
    return shards


def position_of(doc_id: int) -> int:
    return ordinal_of(doc_id) * DOCS_PER_SHARD + (doc_id & 0xFFFFFFFF)


# -- truth ------------------------------------------------------------------------------


def char_shingle_sets(texts: Sequence[str], n: int = 13) -> list[np.ndarray]:
    sets = []
    for text in texts:
        s = normalize(text)
        grams = [s[i : i + n] for i in range(len(s) - n + 1)] if len(s) >= n else [s]
        sets.append(np.unique(np.fromiter((xxhash.xxh3_64_intdigest(g.encode()) for g in grams), np.uint64, len(grams))))
    return sets


def similar_pairs(sets: list[np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) with Jaccard >= threshold, exactly, by prefix filtering."""
    from scipy import sparse

    values, inverse, counts = np.unique(np.concatenate(sets), return_inverse=True, return_counts=True)
    rank = np.empty(len(values), np.int64)
    rank[np.lexsort((values, counts))] = np.arange(len(values))  # rarest first
    bounds = np.cumsum([0] + [len(s) for s in sets])
    rows, cols = [], []
    for i in range(len(sets)):
        ranks = np.sort(rank[inverse[bounds[i] : bounds[i + 1]]])
        prefix = len(ranks) - math.ceil(threshold * len(ranks)) + 1
        rows.append(np.full(prefix, i))
        cols.append(ranks[:prefix])
    rows_, cols_ = np.concatenate(rows), np.concatenate(cols)
    matrix = sparse.csr_matrix((np.ones(len(rows_), np.int32), (rows_, cols_)), shape=(len(sets), len(values)))
    candidates = sparse.triu(matrix @ matrix.T, k=1).tocoo()
    keep = [
        k for k, (a, b) in enumerate(zip(candidates.row, candidates.col))
        if jaccard_sets(sets[a], sets[b]) >= threshold
    ]
    return candidates.row[keep], candidates.col[keep]


def jaccard_sets(a: np.ndarray, b: np.ndarray) -> float:
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def removed_by_clusters(count: int, first: np.ndarray, second: np.ndarray) -> set[int]:
    """Documents with a smaller id in their connected component."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    graph = sparse.coo_matrix((np.ones(len(first)), (first, second)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, count)
    np.minimum.at(smallest, labels, np.arange(count))
    return set(np.flatnonzero(smallest[labels] != np.arange(count)).tolist())


def band_removals(signatures: np.ndarray, bands: int, rows: int) -> set[int]:
    """LSH without verification: documents agreeing on all rows of a band are linked."""
    signed = np.flatnonzero((signatures != UNSIGNED).any(axis=1))
    first, second = [], []
    for band in range(bands):
        keys = signatures[signed, band * rows : (band + 1) * rows]
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        leader = np.full(inverse.max() + 1, len(signatures))
        np.minimum.at(leader, inverse, signed)
        linked = leader[inverse] != signed
        first.append(signed[linked])
        second.append(leader[inverse][linked])
    return removed_by_clusters(len(signatures), np.concatenate(first), np.concatenate(second))


def precision_recall(removed: set[int], truth: set[int]) -> tuple[float, float]:
    hit = len(removed & truth)
    return (hit / len(removed) if removed else 1.0), (hit / len(truth) if truth else 1.0)


# -- the three signature implementations ----------------------------------------------------


def timed(action: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    started = clock()
    result = action()
    return clock() - started, result


def interleaved(implementations: dict[str, Callable], texts: Sequence[str], chunk: int = 500, rounds: int = 3) -> dict[str, tuple[float, np.ndarray]]:
    """CPU seconds (the median of `rounds`) and signatures of each implementation over all
    texts, run chunk by chunk with the implementations taking turns (the first rotating), so
    load from other processes on a shared machine hits them alike."""
    names = list(implementations)
    totals: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for round_ in range(rounds):
        seconds = dict.fromkeys(names, 0.0)
        for index, start in enumerate(range(0, len(texts), chunk)):
            part = texts[start : start + chunk]
            turn = index + round_
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                took, result = timed(lambda: implementations[name](part), time.process_time)
                seconds[name] += took
                if round_ == 0:
                    outputs[name].append(result)
        for name in names:
            totals[name].append(seconds[name])
    return {name: (statistics.median(totals[name]), np.concatenate(outputs[name])) for name in names}


def throughput_table(runs: dict[str, tuple[float, np.ndarray]], texts: Sequence[str], base: str) -> None:
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"\n(load average {load} on {os.cpu_count()} cores: CPU seconds, the median of 3 rounds)")
    print(f"\n| signatures (1 core, CPU time) | docs/s | MB/s | vs {base.split(',')[0]} |\n| --- | ---: | ---: | ---: |")
    for name, (seconds, _) in runs.items():
        print(f"| {name} | {len(texts) / seconds:,.0f} | {megabytes / seconds:.2f} | {runs[base][0] / seconds:.2f}x |")


def kernel_start_up() -> tuple[float, float]:
    """CPU seconds a fresh process takes to import numba and the module and sign its first
    documents, ASCII and not (numba compiling the kernels, or loading them), with an empty numba
    cache and then with the cache that run left. The stage's other imports come before the clock."""
    first_call = (
        "import time, tasks.removals, tasks.stage; started = time.process_time(); "
        "from tasks.near_dedup.minhash import MinHasher; hasher = MinHasher(13, False, 128, 1); "
        "[hasher.signatures([text]) for text in ('the first document', 'déjà vu')]; print(time.process_time() - started)"
    )
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = [subprocess.run([sys.executable, "-c", first_call], cwd=root, env=env, capture_output=True, text=True, check=True) for _ in range(2)]
        cold, cached = (float(run.stdout) for run in runs)
    return cold, cached


def project_signatures(texts: Sequence[str], words: bool) -> np.ndarray:
    hasher = MinHasher(5 if words else 13, words, 112 if words else 128, seed=1)
    bands, rows = (14, 8) if words else (9, 13)
    signatures = np.concatenate([hasher.signatures(texts[i : i + 4096]) for i in range(0, len(texts), 4096)])
    hasher.band_hashes(signatures, bands, rows)
    return signatures


@cache
def datatrove_step():
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    step = MinhashDedupSignature(output_folder=tempfile.mkdtemp(), config=MinhashConfig())
    step._hash_func = datatrove_compat.xxhash64
    return step


def datatrove_signatures(texts: Sequence[str]) -> np.ndarray:
    step = datatrove_step()
    out = np.zeros((len(texts), step.num_hashes), np.uint64)
    for i, text in enumerate(texts):
        shingles = step.get_shingles(text)
        if shingles.size:
            out[i] = np.concatenate(step.get_signature(shingles))
        else:  # datatrove skips documents without shingles (fewer than 5 words)
            out[i] = UNSIGNED
    return out


def char_13grams(text: str) -> list[str]:
    """SlimPajama's shingles: the normalized text's 13-character slices (or itself, if shorter)."""
    s = normalize(text)
    return [s[j : j + 13] for j in range(len(s) - 12)] or [s]


def datasketch_signatures(texts: Sequence[str]) -> np.ndarray:
    from datasketch import MinHash

    out = np.zeros((len(texts), 128), np.uint64)
    for i, text in enumerate(texts):
        minhash = MinHash(num_perm=128)
        minhash.update_batch([g.encode() for g in char_13grams(text)])
        out[i] = minhash.hashvalues
    return out


def rensa_signatures(texts: Sequence[str]) -> np.ndarray:
    """rensa's fastest path for str tokens here: one RMinHash per document (its batch
    digest_matrix_from_token_sets measured slower, holding every document's shingles at once)."""
    from rensa import RMinHash

    out = np.zeros((len(texts), 128), np.uint32)
    for i, text in enumerate(texts):
        minhash = RMinHash(num_perm=128, seed=1)
        minhash.update(char_13grams(text))
        out[i] = minhash.digest()
    return out


# -- the stage on Ray -----------------------------------------------------------------------


def _rss_mib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) // 1024


@cache
def _measured(counts: type[Counts]) -> type[Counts]:
    """A stage's count record with its worker's RSS beside the stage's own counts."""
    return create_model(f"Measured{counts.__name__}", __base__=counts, rss_start_mib=(int, ...), peak_rss_mib=(int, ...))


def measured(work: Callable[[object], ShardResult]) -> Callable[[object], ShardResult]:
    """The work, reporting its worker's RSS when the task began and its peak since."""

    def run(item):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        start = _rss_mib("VmRSS")
        result = work(item)
        counts = _measured(type(result.counts))(**dict(result.counts), rss_start_mib=start, peak_rss_mib=_rss_mib("VmHWM"))
        return result.model_copy(update={"counts": counts})

    return run


@dataclass
class StageRun:
    """What one dedup stage cost, step by step: run(stage) for run_near_dedup / run_exact_dedup."""

    store: Store
    seconds: float = 0.0  # wall time of the whole stage
    peak_mib: int = 0  # the largest per-task peak RSS
    baseline_mib: int = 1 << 30  # the smallest RSS of a worker when a task began
    step_peak_mib: dict[str, int] = field(default_factory=dict)
    step_growth_mib: dict[str, int] = field(default_factory=dict)  # the largest peak minus start of a task
    step_seconds: dict[str, float] = field(default_factory=dict)
    step_files: dict[str, int] = field(default_factory=dict)  # objects written by each step
    step_tasks: dict[str, int] = field(default_factory=dict)

    def __call__(self, stage: Stage):
        seconds, summary = timed(lambda: run_stage(self.store, dataclasses.replace(stage, work=measured(stage.work))))
        step = stage.name.removeprefix("near-").split("-r0")[0]
        receipts = summary.receipts
        self.step_seconds[step] = self.step_seconds.get(step, 0.0) + seconds
        self.step_peak_mib[step] = max([self.step_peak_mib.get(step, 0)] + [r.counts["peak_rss_mib"] for r in receipts])
        growth = [r.counts["peak_rss_mib"] - r.counts["rss_start_mib"] for r in receipts]
        self.step_growth_mib[step] = max([self.step_growth_mib.get(step, 0)] + growth)
        self.step_files[step] = self.step_files.get(step, 0) + sum(len(r.outputs) for r in receipts)
        self.step_tasks[step] = self.step_tasks.get(step, 0) + len(receipts)
        self.baseline_mib = min([self.baseline_mib] + [r.counts["rss_start_mib"] for r in receipts])
        self.peak_mib = max(self.step_peak_mib.values())
        return summary


def sized(cfg: MinHashConfig, documents: int, budget: int = TASK_MEMORY_BYTES) -> MinHashConfig:
    """The config with the partition counts the build would derive for `documents`."""
    bands, _ = bands_rows(cfg)
    return cfg.model_copy(
        update={
            "bucket_partitions": partitions(documents, bands * NEAR_BAND_ROW_BYTES, budget, cfg.bucket_partitions),
            "component_partitions": partitions(documents, NEAR_EDGE_BYTES, budget, cfg.component_partitions),
        }
    )


def measure_near_dedup(store: Store, shards: list[DocsShard], cfg: MinHashConfig, budget: int = TASK_MEMORY_BYTES) -> StageRun:
    """The whole near-dedup stage on Ray, every task's peak RSS recorded in its receipt."""
    run = StageRun(store)
    run.seconds, _ = timed(lambda: run_near_dedup(store, shards, cfg, run, batch_bytes(budget), budget))
    return run


class CountingStore(LocalStore):
    """A local store that counts the reads of each folder under dedup/near/ (a read is an S3 GET);
    merge levels by shuffle (runs/<shuffle>)."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: Counter[str] = Counter()

    def _count(self, key: str) -> None:
        if key.startswith(layout.NEAR):
            parts = key.removeprefix(layout.NEAR).split("/")
            self.reads["/".join(parts[1:3]) if parts[1] == "runs" else parts[1]] += 1

    def get_bytes(self, key: str) -> bytes:
        self._count(key)
        return super().get_bytes(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._count(key)
        return super().get_range(key, start, length)


VERIFY_FOLDERS = ("candidates", "shingles", "runs/candidates", "runs/shingles")  # what the verify path reads
def verify_requests(count: int, budgets: Sequence[int], shard_docs: int) -> None:
    from benchmarks.scale_model import exponent

    texts = zipf_corpus(count)
    text_bytes = sum(len(t.encode()) for t in texts)
    print(f"\n{count:,} documents, {text_bytes / 1e6:.1f} MB, {shard_docs} a docs shard; range reads by folder of dedup/near/")
    print("\n| budget | data/budget | batches | verify groups | " + " | ".join(VERIFY_FOLDERS) + " | verify path | removed |")
    print("| ---: | ---: | ---: | ---: |" + " ---: |" * (len(VERIFY_FOLDERS) + 2))
    points = []
    for budget in budgets:
        with tempfile.TemporaryDirectory() as tmp:
            store = CountingStore(tmp)
            shards = write_shards(store, texts, per_shard=shard_docs)
            run = partial(run_stage, store, inline=True)
            run_near_dedup(store, shards, sized(MinHashConfig(), count, budget), run, batch_bytes(budget), budget)
            batches = len(list(store.list(layout.NEAR_BANDS)))
            groups = len(list(store.list(layout.NEAR_BUCKETS)))
            removed = sum(len(removed_pairs(store, layout.near_merged, s.file)[0]) for s in shards)
        verify = sum(store.reads[f] for f in VERIFY_FOLDERS)
        points.append((text_bytes / budget, verify))
        print(f"| {budget >> 10} KiB | {text_bytes / budget:.1f} | {batches} | {groups} | "
              + " | ".join(str(store.reads[f]) for f in VERIFY_FOLDERS) + f" | {verify} | {removed} |")
    fitted = exponent(*zip(*points))
    print(f"\nverify-path reads vs data/budget: exponent {fitted:.2f}" if fitted is not None else "")


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=20_000, help="documents for throughput and precision/recall")
    parser.add_argument("--scales", default="10000,100000", help="corpus sizes for the whole stage")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--signatures-only", action="store_true", help="only the char 13-gram throughput: project, rensa, datasketch")
    parser.add_argument("--verify-requests", action="store_true", help="only the verify path's reads at each of --budgets")
    parser.add_argument("--budgets", default="1M,2M,4M,8M", help="task memory budgets for --verify-requests")
    parser.add_argument("--shard-docs", type=int, default=50, help="documents a docs shard for --verify-requests (small: many batches)")
    args = parser.parse_args()

    if args.verify_requests:
        verify_requests(args.sample, [parse_bytes(b) for b in args.budgets.split(",")], args.shard_docs)
        return

    if args.signatures_only:
        print(f"python {platform.python_version()}, numpy {version('numpy')}, numba {version('numba')}, rensa {version('rensa')}, datasketch {version('datasketch')}")
        cold, cached = kernel_start_up()
        print(f"numba kernels in a fresh process: {cold:.1f} CPU s compiling (empty cache), {cached:.1f} CPU s from the cache")
        texts = code_corpus(args.sample)
        print(f"\nsample: {len(texts)} documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB (stdlib sources, 25% edited copies)")
        implementations = {PROJECT_CHARS: lambda chunk: project_signatures(chunk, words=False), RENSA: rensa_signatures, DATASKETCH: datasketch_signatures}
        project_signatures(texts[:8], words=False)  # the kernels, compiled or loaded before the clock
        throughput_table(interleaved(implementations, texts), texts, RENSA)
        return

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"python {platform.python_version()}, numpy {version('numpy')}, datatrove {version('datatrove')}, "
          f"spacy {version('spacy')}, datasketch {version('datasketch')}, rensa {version('rensa')}, {os.cpu_count()} cores, ray workers {args.cpus}")

    if args.sample:
        sample_benchmarks(args.sample)
    scale_benchmarks([int(c) for c in args.scales.split(",") if c])
    print(f"\n(driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB)")


def warm_up() -> None:
    """Start the Ray workers and their imports before anything is timed."""
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        measure_near_dedup(store, write_shards(store, zipf_corpus(200)), MinHashConfig(bucket_partitions=2, component_partitions=2))


def sample_benchmarks(count: int) -> None:
    texts = code_corpus(count)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"\nsample: {len(texts)} documents, {megabytes:.1f} MB (stdlib sources, 25% edited copies)")
    for words in (False, True):  # the kernels, compiled or loaded before the clock
        project_signatures(texts[:8], words)

    implementations = {
        PROJECT_CHARS: lambda chunk: project_signatures(chunk, words=False),
        "project, word 5-grams x 112": lambda chunk: project_signatures(chunk, words=True),
        RENSA: rensa_signatures,
        DATATROVE: datatrove_signatures,
        DATASKETCH: datasketch_signatures,
    }
    runs = interleaved(implementations, texts)
    throughput_table(runs, texts, RENSA)

    seconds, sets = timed(lambda: char_shingle_sets(texts))
    pair_seconds, (first, second) = timed(lambda: similar_pairs(sets, THRESHOLD))
    truth = removed_by_clusters(len(texts), first, second)
    print(f"\ntruth: {len(first)} pairs with J >= {THRESHOLD}, {len(truth)} documents to remove "
          f"(shingles {seconds:.0f} s, exact all-pairs {pair_seconds:.0f} s)")

    results = {
        "datatrove (14 x 8 bands, no verification)": band_removals(runs[DATATROVE][1], 14, 8),
        "datasketch = SlimPajama (9 x 13, no verification)": band_removals(runs[DATASKETCH][1], 9, 13),
    }
    stage_runs = {}
    warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in [
            ("project 16 x 8, verified (default)", MinHashConfig(bucket_partitions=4, component_partitions=4)),
            ("project 16 x 8, no verification", MinHashConfig(bucket_partitions=4, component_partitions=4, verify=False)),
            ("project 9 x 13, verified (SlimPajama preset)", MinHashConfig(bands=9, rows=13, bucket_partitions=4, component_partitions=4)),
        ]:
            store = LocalStore(Path(tmp) / label.replace(" ", "_").replace(",", ""))
            shards = write_shards(store, texts)
            stage_runs[label] = measure_near_dedup(store, shards, cfg)
            results[label] = {position_of(int(d)) for s in shards for d in removed_pairs(store, layout.near_merged, s.file)[0]}
    print("\n| method | removed | precision | recall |\n| --- | ---: | ---: | ---: |")
    for name, removed in results.items():
        precision, recall = precision_recall(removed, truth)
        print(f"| {name} | {len(removed)} | {precision:.3f} | {recall:.3f} |")
    print("\n| whole stage on the sample | wall s | largest task peak RSS MiB |\n| --- | ---: | ---: |")
    for label, run in stage_runs.items():
        print(f"| {label} | {run.seconds:.1f} | {run.peak_mib} |")


def scale_benchmarks(counts: Sequence[int]) -> None:
    print("\n| documents | MB | shards | partitions (bucket / component) | wall s | docs/s | largest task peak RSS MiB | worker baseline MiB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    details = []
    warm_up()
    for count in counts:
        texts = zipf_corpus(count)
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalStore(tmp)
            shards = write_shards(store, texts)
            cfg = sized(MinHashConfig(), count)
            run = measure_near_dedup(store, shards, cfg)
        size = sum(len(t.encode()) for t in texts) / 1e6
        print(f"| {count:,} | {size:.0f} | {len(shards)} | {cfg.bucket_partitions} / {cfg.component_partitions} | {run.seconds:.1f} | {count / run.seconds:,.0f} "
              f"| {run.peak_mib} | {run.baseline_mib} |")
        details.append((count, run))
    for count, run in details:
        steps = ", ".join(f"{step} {run.step_seconds[step]:.1f} s / {run.step_peak_mib[step]} MiB" for step in run.step_seconds)
        print(f"\n{count:,} documents, per step (wall / largest task peak): {steps}")


if __name__ == "__main__":
    main()
