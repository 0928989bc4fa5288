"""MinHash shingles and signatures against a plain per-document reference written from the
definitions in tasks/near_dedup/minhash.py (Python integers for the hashes, one document at
a time), and against digests pinned from the implementation before the batch vectorization:
the signatures must never change."""

from __future__ import annotations

import hashlib
import random
import string
from functools import cache

import numpy as np
import pytest

from tasks.near_dedup import minhash
from tasks.near_dedup.minhash import MinHasher, normalize

MASK64 = (1 << 64) - 1
CONFIGS = [(False, 13, 128), (True, 5, 112), (False, 5, 16), (True, 2, 16)]  # words, n, permutations


# -- the reference ----------------------------------------------------------------------


def reference_normalize(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def reference_shingles(text: str, n: int, words: bool) -> list[str]:
    """Every shingle in order, repeats included; a text shorter than n units is one shingle."""
    s = reference_normalize(text)
    units = list(s) if not words else (s.split(" ") if s else [])
    if len(units) < n:
        return [s]
    return ["".join(units[i : i + n]) if not words else " ".join(units[i : i + n]) for i in range(len(units) - n + 1)]


@cache
def power(base: int, t: int) -> int:
    return pow(base, t, 1 << 64)


def reference_hash(hasher: MinHasher, shingle: str) -> int:
    """fmix64(sum_t code_t * base^t + length * length_key, xor shingle_key), in Python integers."""
    raw = sum(ord(char) * power(hasher._base, t) for t, char in enumerate(shingle))
    h = ((raw + len(shingle) * int(hasher._length_key)) & MASK64) ^ int(hasher._shingle_key)
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> 33
        h = (h * multiplier) & MASK64
    return h ^ (h >> 33)


def reference_signature(hasher: MinHasher, text: str) -> np.ndarray:
    """min over the shingles of (a_i * top32(hash) + b_i) mod 2^32, one permutation per row."""
    keys = np.array([reference_hash(hasher, s) >> 32 for s in set(reference_shingles(text, hasher.ngram, hasher.words))], np.uint64)
    a, b = hasher._a.astype(np.uint64)[:, None], hasher._b.astype(np.uint64)[:, None]
    return ((a * keys + b) & np.uint64(0xFFFFFFFF)).min(axis=1).astype(np.uint32)  # < 2^64: no wrap


# -- a corpus of varied texts -----------------------------------------------------------

SPECIAL = [
    "",
    "   \t\n ",
    "!!! ... ???",
    "Hi there",  # shorter than 13 characters once normalized
    "abcdefghijkl",  # 12
    "abcdefghijklm",  # 13
    "abcd efghijklm",  # 14
    "  Leading and trailing whitespace\t\n",
    "The Quick, brown fox -- jumps over the lazy dog!\n\nAnd then\tsome MORE words follow here.",
    "Ünïcödé tëxt wïth äccents, ΕΛΛΗΝΙΚΆ and 漢字 and emoji 🙂🙂 in it.",
    "ΟΔΟΣ ΣΑΣ ΟΔΟΣ.",  # final sigma: lowercasing depends on the neighbours
    "İstanbul İzmir",  # İ lowercases to two code points
    "unicode\x1cseparators\x1dand\x1ethe\x1fothers\x85nel\xa0nbsp\u2028line\u3000ideographic space",
    "a lone surrogate \ud800 in the middle",
    "".join(chr(c) for c in range(128)) * 2,  # every ASCII character
    "word " * 40,
    "x" * 20,
]


def random_texts(seed: int, count: int) -> list[str]:
    """ASCII and non-ASCII texts with whitespace runs, punctuation and mixed case."""
    rng = random.Random(seed)
    letters = string.ascii_letters + "0123456789" + "éßΣç漢"
    separators = [" ", "  ", "\t", "\n\n", " - ", ", ", "...", "\u3000", "   \n\t "]
    texts = []
    for _ in range(count):
        words = ["".join(rng.choices(letters if rng.random() < 0.2 else string.ascii_letters, k=rng.randint(1, 9))) for _ in range(rng.randint(0, 120))]
        texts.append("".join(w + rng.choice(separators) for w in words) + rng.choice(["", " ", "!", "\n"]))
    return texts


def long_texts() -> list[str]:
    """Longer than one batch (PIECE_CHARS), ASCII and not: cut into pieces. Each repeats a
    short random text, so the reference has few distinct shingles to hash."""
    rng = random.Random(9)
    base = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))) for _ in range(600))
    repeats = 300_000 // len(base) + 1
    return [(base + "\n") * repeats, ("Ω " + base) * repeats]


CORPUS = SPECIAL + random_texts(1, 60)


# -- tests ------------------------------------------------------------------------------


def test_normalize_matches_the_reference():
    for text in CORPUS + long_texts():
        assert normalize(text) == reference_normalize(text), repr(text[:80])


@pytest.mark.parametrize("words,n,num_perm", CONFIGS)
@pytest.mark.parametrize("tiny_pieces", [False, True])
def test_signatures_match_the_reference(monkeypatch, words, n, num_perm, tiny_pieces):
    texts = CORPUS
    if tiny_pieces:  # every batch a few pieces: long texts cut, documents across batches
        monkeypatch.setattr(minhash, "PIECE_CHARS", 37)
        monkeypatch.setattr(minhash, "PIECE_WORDS", 3)
    else:
        texts = CORPUS[:20] + long_texts() + CORPUS[20:]
        assert all(len(text) > minhash.PIECE_CHARS for text in long_texts())
    hasher = MinHasher(n, words, num_perm, seed=5)
    signatures, sizes = hasher.signatures_and_sizes(texts)
    for text, signature, size in zip(texts, signatures, sizes):
        assert np.array_equal(signature, reference_signature(hasher, text)), repr(text[:80])
        assert size == len(reference_shingles(text, n, words)), repr(text[:80])


@pytest.mark.parametrize("words,n,num_perm", CONFIGS)
def test_shingle_sets_match_the_reference(monkeypatch, words, n, num_perm):
    monkeypatch.setattr(minhash, "PIECE_CHARS", 53)
    monkeypatch.setattr(minhash, "PIECE_WORDS", 4)
    hasher = MinHasher(n, words, num_perm, seed=5)
    for text, got in zip(CORPUS, hasher.shingle_sets(CORPUS)):
        assert got.tolist() == sorted({reference_hash(hasher, s) for s in reference_shingles(text, n, words)}), repr(text[:80])


@pytest.mark.parametrize(
    "words,n,num_perm,digest",
    [
        (False, 13, 128, "c79285ef0cac87a2c600696ed53fdde6d0fc13f150d1d2ec2fbf379601996cd4"),
        (True, 5, 112, "6228c168c24e2d9915a80ae0d4c2dad26e4dedbe520f8f38544163c88fedf7f4"),
    ],
)
def test_signatures_are_the_ones_from_before_the_batch_vectorization(words, n, num_perm, digest):
    """sha256 of the corpus's signatures as the per-document implementation computed them."""
    signatures = MinHasher(n, words, num_perm, seed=1).signatures(CORPUS + long_texts())
    assert hashlib.sha256(signatures.astype("<u4").tobytes()).hexdigest() == digest
