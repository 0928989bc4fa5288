"""A sample corpus made with no network from the text every Python installation carries.

It is shaped like TinyLlama's sources:
- `slimpajama/chunk_NNNN.jsonl.zst`: lines {"text": ..., "meta": {"redpajama_set_name": ...}},
  prose made of paragraphs of the standard library's docstrings and string literals, source
  comments, pydoc's help topics, its LICENSE and `this`; plus RedPajamaGithub documents
  (slices of source files) that the build config excludes, as SlimPajama's recipe does.
- `starcoder/part-NNNNN.parquet`: columns content, lang, max_stars_repo_path,
  max_stars_repo_name, max_stars_count; the standard library's own .py files first, then
  files made of their blocks.

Beyond the text that exists, documents are new mixtures of paragraphs (4 or more per
document, each 200-800 characters; code blocks 200-3000), so a larger corpus repeats
paragraphs but not documents: two documents share most of their text only by chance
(a handful at 1 GB), so the near-duplicate stage finds little that was not planted.
Duplicates are planted, within and across files, never across sources and never of excluded
documents, and reported, so a test can check that dedup removes exactly them: exact copies
(about DUPLICATE_RATE of the documents) and near copies (about NEAR_DUPLICATE_RATE): an earlier
document with one word in every NEAR_EDIT_CHARS characters replaced by another word of it,
which keeps the Jaccard similarity of their 13-gram shingles near 0.9, well above the near
dedup threshold of 0.8. Everything is a function of the seed and the Python installation.
`sample.yaml` next to the corpus builds it.
"""

from __future__ import annotations

import codecs
import hashlib
import inspect
import io
import json
import os
import random
import re
import sysconfig
import unicodedata
from functools import lru_cache
from pathlib import Path

import orjson
import pydoc_data.topics
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
import zstandard

from tasks.config import BuildConfig

DUPLICATE_RATE = 0.04
NEAR_DUPLICATE_RATE = 0.04
NEAR_EDIT_CHARS = 400  # a near copy has one word changed per this many characters (at least one)
COPYABLE = 4096  # originals a copy is drawn from: a seeded reservoir, so memory stays flat
SLIMPAJAMA_SHARE = 0.7  # of the bytes; the rest is Starcoder (TinyLlama's ~7:3)
MIN_DOC_CHARS = 400  # above the build's default min_chars, so every document reaches dedup
MAX_SOURCE_FILE_CHARS = 100_000

# SlimPajama's subsets and roughly their shares of documents. Github is excluded by the config.
SLIMPAJAMA_SETS = {
    "RedPajamaCommonCrawl": 0.52,
    "RedPajamaC4": 0.27,
    "RedPajamaGithub": 0.05,
    "RedPajamaWikipedia": 0.06,
    "RedPajamaStackExchange": 0.06,
    "RedPajamaBook": 0.04,
}
EXCLUDED_SET = "RedPajamaGithub"

# Folders whose files are tests, generated tables or near-copies of each other.
_SKIP_DIRS = {"test", "tests", "idlelib", "encodings", "lib2to3", "ensurepip", "turtledemo",
              "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
_STRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_COMMENT_BLOCK = re.compile(r"(?:^[ \t]*#[^\n]*\n)+", re.M)
_WORD = re.compile(r"[A-Za-z]{3,}")


def make_sample_corpus(out_dir: str | os.PathLike, target_bytes: int = 4 << 20, seed: int = 42) -> dict:
    """Write about `target_bytes` of UTF-8 text as a corpus and its `sample.yaml`; return a summary.

    The summary: root, config (the YAML's path), seed, documents per source; per source
    its files (relative to root, in order), documents, bytes and excluded documents;
    `duplicates`: every planted exact copy as {source, file, record, original_file,
    original_record} (records are 0-based lines or rows; the original is the first
    occurrence in file order); and `near_duplicates`: every planted near copy, the same way,
    with `words_changed`.
    """
    root = Path(out_dir).resolve()
    rng = random.Random(seed)
    chunk_bytes = max(target_bytes // 16, 16 << 10)
    prose, code, sources = _text_pools()
    seen: set[bytes] = set()  # digests of every text written, so that only planted copies repeat
    duplicates: list[dict] = []
    near_duplicates: list[dict] = []

    slimpajama = _Writer(root, "slimpajama", "chunk_{:04d}.jsonl.zst", chunk_bytes, _write_jsonl_zst)
    target = int(target_bytes * SLIMPAJAMA_SHARE)
    set_names, set_weights = list(SLIMPAJAMA_SETS), list(SLIMPAJAMA_SETS.values())
    while slimpajama.bytes < target:
        if slimpajama.originals and (roll := rng.random()) < DUPLICATE_RATE + NEAR_DUPLICATE_RATE:
            if roll < DUPLICATE_RATE:
                duplicates.append(slimpajama.add_copy(rng))
            elif planted := slimpajama.add_near_copy(rng, seen):
                near_duplicates.append(planted)
            continue
        set_name = rng.choices(set_names, set_weights)[0]
        while True:
            if set_name == EXCLUDED_SET:
                _, source = sources[rng.randrange(len(sources))]
                text = _source_slice(source, rng)
            else:
                low, high = (20, 60) if set_name == "RedPajamaBook" else (4, 14)
                text = "\n\n".join(rng.sample(prose, rng.randint(low, high)))
            if len(text) >= MIN_DOC_CHARS and _is_new(text, seen):
                break
        record = {"text": text, "meta": {"redpajama_set_name": set_name}}
        slimpajama.add(record, rng, excluded=set_name == EXCLUDED_SET)
    slimpajama.close()

    starcoder = _Writer(root, "starcoder", "part-{:05d}.parquet", chunk_bytes, _write_parquet)
    target = target_bytes - slimpajama.bytes
    natural = [(path, text) for path, text in sources if MIN_DOC_CHARS <= len(text) <= MAX_SOURCE_FILE_CHARS]
    rng.shuffle(natural)
    made = 0
    while starcoder.bytes < target:
        if starcoder.originals and (roll := rng.random()) < DUPLICATE_RATE + NEAR_DUPLICATE_RATE:
            fork = {"max_stars_repo_name": "fork/cpython"}
            if roll < DUPLICATE_RATE:
                duplicates.append(starcoder.add_copy(rng, meta=fork))
            elif planted := starcoder.add_near_copy(rng, seen, meta=fork):
                near_duplicates.append(planted)
            continue
        if natural:
            path, text = natural.pop()
            if not _is_new(text, seen):
                continue
            repo_path = f"Lib/{path}"
        else:
            while not _is_new(text := "\n\n".join(rng.sample(code, rng.randint(4, 16))), seen):
                pass
            repo_path, made = f"synthetic/module_{made:06d}.py", made + 1
        row = {"content": text, "lang": "Python", "max_stars_repo_path": repo_path,
               "max_stars_repo_name": "python/cpython", "max_stars_count": 0}
        starcoder.add(row, rng)
    starcoder.close()

    config_path = root / "sample.yaml"
    config_path.write_text(_sample_config(root, target_bytes, seed))
    summary = {
        "root": str(root),
        "config": str(config_path),
        "seed": seed,
        "documents": {writer.name: writer.documents for writer in (slimpajama, starcoder)},
        "sources": {writer.name: writer.summary() for writer in (slimpajama, starcoder)},
        "duplicates": duplicates,
        "near_duplicates": near_duplicates,
    }
    (root / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class _Writer:
    """Collects one source's documents into files of about `chunk_bytes` of text each."""

    def __init__(self, root: Path, name: str, pattern: str, chunk_bytes: int, write):
        self.name, self._root, self._pattern, self._chunk_bytes, self._write = name, root, pattern, chunk_bytes, write
        (root / name).mkdir(parents=True, exist_ok=True)
        self.files: list[str] = []
        self.records: list[dict] = []  # of the file being filled
        self.originals: list[tuple[int, int, dict]] = []  # (file number, record number, record) to copy from
        self.bytes = self.documents = self.excluded = 0
        self._file_bytes = self._seen_originals = 0

    def add(self, record: dict, rng: random.Random, excluded: bool = False, copy: bool = False) -> None:
        """Add a document; an original one (neither excluded nor a copy) may be copied later."""
        if excluded:
            self.excluded += 1
        elif not copy:
            self._seen_originals += 1
            original = (len(self.files), len(self.records), record)
            if len(self.originals) < COPYABLE:
                self.originals.append(original)
            elif (slot := rng.randrange(self._seen_originals)) < COPYABLE:
                self.originals[slot] = original
        self.records.append(record)
        size = len(_text(record).encode("utf-8"))
        self.bytes += size
        self._file_bytes += size
        self.documents += 1
        if self._file_bytes >= self._chunk_bytes:
            self._flush()

    def add_copy(self, rng: random.Random, meta: dict | None = None) -> dict:
        """Repeat an earlier document of this source; return what was planted."""
        file_number, record_number, record = self.originals[rng.randrange(len(self.originals))]
        planted = self._planted(file_number, record_number)
        self.add({**record, **(meta or {})}, rng, copy=True)
        return planted

    def add_near_copy(self, rng: random.Random, seen: set[bytes], meta: dict | None = None) -> dict | None:
        """Repeat an earlier document of this source with a few words changed; return what was
        planted (None if the edit made a text that exists already)."""
        file_number, record_number, record = self.originals[rng.randrange(len(self.originals))]
        field = "text" if "text" in record else "content"
        text, changed = _change_words(record[field], rng)
        if not changed or not _is_new(text, seen):
            return None
        planted = {**self._planted(file_number, record_number), "words_changed": changed}
        self.add({**record, field: text, **(meta or {})}, rng, copy=True)
        return planted

    def _planted(self, file_number: int, record_number: int) -> dict:
        """Where the next document goes, and the original it copies."""
        return {
            "source": self.name,
            "file": self._file_name(len(self.files)),
            "record": len(self.records),
            "original_file": self._file_name(file_number),
            "original_record": record_number,
        }

    def _file_name(self, number: int) -> str:
        return f"{self.name}/{self._pattern.format(number)}"

    def _flush(self) -> None:
        name = self._file_name(len(self.files))
        self._write(self._root / name, self.records)
        self.files.append(name)
        self.records, self._file_bytes = [], 0

    def close(self) -> None:
        if self.records or not self.files:
            self._flush()

    def summary(self) -> dict:
        return {"files": self.files, "documents": self.documents, "bytes": self.bytes, "excluded": self.excluded}


def _text(record: dict) -> str:
    return record["text"] if "text" in record else record["content"]


def _write_if_changed(path: Path, data: bytes) -> None:
    """Keep a file that already holds `data`: a build pins its inputs' identity (mtime, inode),
    so making the same corpus again must not look like new inputs to a build planned from it."""
    if not (path.exists() and path.read_bytes() == data):
        path.write_bytes(data)


def _write_jsonl_zst(path: Path, records: list[dict]) -> None:
    data = b"".join(orjson.dumps(record) + b"\n" for record in records)
    _write_if_changed(path, zstandard.ZstdCompressor(level=3).compress(data))


def _write_parquet(path: Path, records: list[dict]) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer, compression="zstd")
    _write_if_changed(path, buffer.getvalue())


def _is_new(text: str, seen: set[bytes]) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
    if digest in seen:
        return False
    seen.add(digest)
    return True


def _change_words(text: str, rng: random.Random) -> tuple[str, int]:
    """`text` with one word in every NEAR_EDIT_CHARS characters (at least one) replaced by another
    of its words; returns it and how many words changed."""
    words = list(_WORD.finditer(text))
    picked = sorted(rng.sample(range(len(words)), min(len(words), max(1, len(text) // NEAR_EDIT_CHARS))))
    pieces, start, changed = [], 0, 0
    for index in picked:
        word = words[index]
        other = words[rng.randrange(len(words))].group()
        if other.lower() == word.group().lower():  # the same shingles: no change
            continue
        pieces += [text[start : word.start()], other]
        start, changed = word.end(), changed + 1
    return "".join(pieces) + text[start:], changed


def _source_slice(source: str, rng: random.Random) -> str:
    lines = source.splitlines()
    length = rng.randint(40, 200)
    start = rng.randrange(max(len(lines) - length, 0) + 1)
    return "\n".join(lines[start : start + length]) + "\n"


@lru_cache(maxsize=1)
def _text_pools() -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(prose paragraphs, code blocks, (path, text) of the source files), all unique and NFC."""
    sources = _stdlib_sources()
    prose_texts = []
    for path, text in sources:
        strings = [inspect.cleandoc(a or b) for a, b in _STRING.findall(text)]
        if path == "this.py":  # the Zen of Python, kept there in rot13
            strings = [codecs.decode(string, "rot13") for string in strings]
        prose_texts += strings
        prose_texts += [_uncomment(block) for block in _COMMENT_BLOCK.findall(text)]
    prose_texts += [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    license_file = Path(sysconfig.get_path("stdlib")) / "LICENSE.txt"
    if license_file.is_file():
        prose_texts.append(license_file.read_text(encoding="utf-8", errors="replace"))
    prose = [block for text in prose_texts for block in _blocks(text, 200, 800)]
    code = [block for _, text in sources for block in _blocks(text, 200, 3000)]
    return list(dict.fromkeys(prose)), list(dict.fromkeys(code)), sources


def _stdlib_sources() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_path("stdlib"))
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(folder) / name
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                found.append((path.relative_to(root).as_posix(), _clean(text)))
    return sorted(found)


def _clean(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\x00", ""))


def _uncomment(block: str) -> str:
    lines = (line.strip().lstrip("#").strip() for line in block.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith(("!", "-*-")) and set(line) - set("-=#*~"))


def _blocks(text: str, low: int, high: int) -> list[str]:
    """Cut text at blank lines (or lines, or characters) into pieces of at most `high`
    characters and join neighbours up to `high`; keep those of at least `low` characters."""
    pieces = []
    for paragraph in re.split(r"\n[ \t]*\n", _clean(text)):
        paragraph = paragraph.strip("\n").rstrip()
        while len(paragraph) > high:
            cut = paragraph.rfind("\n", 0, high)
            cut = cut if cut > 0 else high
            pieces.append(paragraph[:cut].rstrip())
            paragraph = paragraph[cut:].strip("\n")
        pieces.append(paragraph)
    blocks, current = [], ""
    for piece in pieces:
        if not piece.strip():
            continue
        if current and len(current) + 2 + len(piece) > high:
            blocks.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    blocks.append(current)
    return [block for block in blocks if len(block) >= low]


def _sample_config(root: Path, target_bytes: int, seed: int) -> str:
    shard_tokens = 1 << max(14, (target_bytes // 64).bit_length() - 1)  # ~16 token shards (~4 bytes a token)
    config = {
        "name": "sample",
        "output": str(root.parent),  # data/ for the default data/raw, as the demo and `tinyllama serve` use it
        "sources": [
            {
                "name": "slimpajama",
                "uri": f"{root}/slimpajama/*.jsonl.zst",
                "format": "jsonl.zst",
                "text_field": "text",
                "meta_fields": ["meta.redpajama_set_name"],
                "exclude": {"meta.redpajama_set_name": [EXCLUDED_SET]},
            },
            {
                "name": "starcoder",
                "uri": f"{root}/starcoder/*.parquet",
                "format": "parquet",
                "text_field": "content",
                "meta_fields": ["lang", "max_stars_repo_path"],
            },
        ],
        "tokenizer": {"train": {"vocab_size": 4096 if target_bytes < 256 << 20 else 32000}},
        "dedup": {"exact": True, "near": True},
        "minhash": {"bucket_partitions": 4, "component_partitions": 4},
        "shard_tokens": shard_tokens,
        "seed": seed,
    }
    BuildConfig.model_validate(config)  # the corpus and the config contract must agree
    header = "# Builds the sample corpus made by demo/sample_corpus.py: tinyllama build-dataset sample.yaml\n"
    return header + yaml.safe_dump(config, sort_keys=False)
