"""Texts and SentencePiece models for the tokenize tests: the sample corpus, a hostile set,
seeded random strings, and models trained here (no downloads)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import sentencepiece as spm
import zstandard

from demo.sample_corpus import make_sample_corpus

HOSTILE = [
    "", " ", "   ", "\n", "\t", " \n\t ", "\n\nparagraph", "trailing spaces   ", "   leading spaces", "trailing newline\n",
    "    def f(x):\n        return x  # indented\n", "\tif a:\n\t\tpass", "x  =  1;;  y=2\r\n", "a \t b\t \tc",
    "0", "1234567890", "3.14159e-10 and 2,147,483,647", "v1.2.3-rc4", "٣٤٥ ١٢", "１２３ fullwidth ＡＢＣ",
    "東京タワー", "東京タワー 東京 タワー", "Ünïcödé naïve café", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "한국어 텍스트",
    "mixed東京Привет123مرحباabc", "emoji 🙂🚀 and ZWJ 👩‍💻", "\u200b zero width \u00a0 nbsp \u3000 ideographic",
    "a\u00a0 b \u00a0c", "combining e\u0301 and ﬁ ligature Ⅻ ㍿", "\x00nul\x00 \x01\x7f control \x1b[0m",
    "<s> literal </s> and <unk>", "<0x41> looks like a byte piece", "▁ the meta symbol itself ▁▁",
    "▁", "▁▁▁", "a▁b", " ▁ ", "▁ leading meta", "trailing meta▁", "x ▁y", "\u2581\u2581x  \u2581 y",
    "\ufffd replacement \U0010fffd private \ufeff bom", "\r\r\n\n\u2028\u2029 separators",
]
LONG = [
    "a" * 100_000, "word " * 20_000, "東京" * 50_000, " " * 100_000, "▁" * 100_000, "1234567890" * 10_000,
    "def f():\n    return 1\n" * 4_000, "".join(chr(0x400 + i % 200) for i in range(100_000)),
]
PIECES = [
    " ", " ", " ", "  ", "    ", "\t", "\n", "\r\n", "\u2581", "\u00a0", "\u3000", "\u200b", "\x00", "\x01", "\x7f",
    "0", "7", "42", "3.14", "1e9", "the", "The", "word", "ing", "a", "x", "_", "(", ")", "{", "}", ";", ",", ".",
    "東", "京", "日本語", "タワー", "مرحبا", "Привет", "мир", "é", "e\u0301", "ﬁ", "Ⅻ", "ｶ", "🙂", "👩‍💻", "\ufffd",
    "<s>", "</s>", "<unk>", "<0x41>",
]


def random_texts(count: int, seed: int) -> list[str]:
    """Strings of pieces and arbitrary code points (no surrogates), some empty, some long."""
    rng = random.Random(seed)

    def code_point() -> str:
        value = rng.randrange(0x110000 - 0x800)
        return chr(value if value < 0xD800 else value + 0x800)

    texts = []
    for _ in range(count):
        parts = rng.choices(PIECES, k=rng.choice([0, 1, 3, 10, 40, 200]))
        parts += [code_point() for _ in range(rng.randrange(4))]
        rng.shuffle(parts)
        texts.append("".join(parts))
    return texts


def corpus_texts(root: Path, target_bytes: int = 2 << 20, seed: int = 3) -> list[str]:
    """The documents of a sample corpus (prose and code), in file order."""
    make_sample_corpus(root, target_bytes=target_bytes, seed=seed)
    texts = []
    for path in sorted(root.rglob("*.jsonl.zst")):
        with zstandard.ZstdDecompressor().stream_reader(path.open("rb")) as reader:
            texts += [json.loads(line)["text"] for line in reader.read().splitlines()]
    for path in sorted(root.rglob("*.parquet")):
        texts += pq.read_table(path, columns=["content"]).column("content").to_pylist()
    return texts


def training_lines(texts: list[str]) -> list[str]:
    """Non-empty lines, with some of every script the hostile texts use, so the vocabulary has them."""
    scripts = ["東京タワーは高い。日本語の文章です。", "Привет, мир! Как дела?", "مرحبا بالعالم", "한국어 텍스트", "emoji 🙂🚀"]
    return [line for text in texts for line in text.splitlines() if line.strip()] + scripts * 30


def train(lines: list[str], **options) -> bytes:
    """A small BPE model (vocabulary 1024) trained on `lines` with SentencePiece `options`."""
    model = io.BytesIO()
    settings = dict(model_type="bpe", vocab_size=1024, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, minloglevel=2, num_threads=1, **{**settings, **options}
    )
    return model.getvalue()
