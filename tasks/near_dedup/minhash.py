"""MinHash signatures and shingle sets, vectorized with numpy (no per-shingle Python loop).

A signature is a pure function of the text and the config (n-gram size, shingle kind,
permutations, seed): every constant below is fixed, the per-seed parameters come from a
hand-written splitmix64 stream (not numpy's generators, whose streams may change between
versions), and only wrapping integer arithmetic is used. No Python `hash()`.

Pipeline per document (SlimPajama's recipe by default):
1. normalize: lowercase, drop ASCII punctuation, collapse whitespace runs to one space and
   strip (SlimPajama's `get_features`);
2. shingles: character n-grams, or word n-grams (words are the space-separated tokens); a
   text shorter than one n-gram is a single shingle (the whole normalized text);
3. each shingle hashes to 64 bits: a polynomial hash of its code points (computed for all
   shingles at once from prefix sums), plus its length, finalized by murmur3's fmix64;
4. permutation i maps the top 32 bits x of a shingle hash to (a_i * x + b_i) mod 2^32
   (a_i odd: a bijection), and signature value i is the minimum over the document's
   shingles. 32-bit arithmetic packs twice the SIMD lanes of 64-bit, and 32-bit minima are
   what datasketch (hence SlimPajama) keeps as well; the Jaccard estimates match the
   binomial error of ideal permutations (see tests).
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence

import numpy as np

_MASK64 = (1 << 64) - 1
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPACE = 32
PIECE_CHARS = 1 << 20  # texts are shingled in batches of about this many code points
PIECE_WORDS = 1 << 17  # a longer text is cut into overlapping pieces of this many words
_BLOCK_VALUES = 1 << 20  # a permutation block holds about this many uint32 (num_perm x shingles)


def normalize(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace to single spaces, strip."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def splitmix64(seed: int) -> Iterator[int]:
    """The splitmix64 stream: stable 64-bit parameters from a seed."""
    state = seed & _MASK64
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        yield z ^ (z >> 31)


def fmix64(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer, in place on a uint64 array (and returned)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


def _powers(base: int, count: int) -> np.ndarray:
    """base**t mod 2^64 for t in [0, count)."""
    powers = np.full(count, base, dtype=np.uint64)
    powers[:1] = 1
    return np.cumprod(powers, out=powers)


class MinHasher:
    """Shingles, signatures and band hashes for one config; cheap to build, picklable."""

    def __init__(self, ngram: int, words: bool, num_perm: int, seed: int):
        self.ngram, self.words, self.num_perm = ngram, words, num_perm
        stream = splitmix64(seed)
        self._base = next(stream) | 1  # odd, hence invertible mod 2^64
        self._base_inverse = pow(self._base, -1, 1 << 64)
        self._length_key = np.uint64(next(stream) | 1)
        self._shingle_key = np.uint64(next(stream))
        perms = np.array([next(stream) for _ in range(num_perm)], dtype=np.uint64)
        self._a = ((perms >> np.uint64(32)) | np.uint64(1)).astype(np.uint32)
        self._b = (perms & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        self._band_seed = next(stream)

    # -- shingles -------------------------------------------------------------------------

    def _pieces(self, text: str) -> list[str]:
        """A normalized text, cut (if long) into pieces that overlap by n-1 units, so that
        every shingle lies whole inside some piece; repeats are harmless to minima and sets."""
        n = self.ngram
        if len(text) <= PIECE_CHARS:
            return [text]
        if not self.words:
            return [text[i : i + PIECE_CHARS + n - 1] for i in range(0, len(text) - n + 1, PIECE_CHARS)]
        spaces = np.flatnonzero(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4") == _SPACE)
        starts = np.concatenate([[0], spaces + 1])
        ends = np.concatenate([spaces, [len(text)]])
        count = len(starts)
        return [
            text[starts[w] : ends[min(w + PIECE_WORDS + n - 1, count) - 1]]
            for w in range(0, max(count - n + 1, 1), PIECE_WORDS)
        ]

    def _batches(self, texts: Sequence[str]) -> Iterator[tuple[list[str], list[int]]]:
        """(pieces, owning document of each piece), about PIECE_CHARS code points at a time."""
        pieces: list[str] = []
        owners: list[int] = []
        size = 0
        for doc, text in enumerate(texts):
            for piece in self._pieces(normalize(text)):
                pieces.append(piece)
                owners.append(doc)
                size += len(piece)
                if size >= PIECE_CHARS:
                    yield pieces, owners
                    pieces, owners, size = [], [], 0
        if pieces:
            yield pieces, owners

    def _spans(self, codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[start, end) code-point spans of every shingle of pieces laid end to end, and the
        piece of each. A piece shorter than one n-gram is one span: the whole piece."""
        n = self.ngram
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        if not self.words:
            units = lengths  # characters
            unit_start = offsets
        else:
            is_space = codes == _SPACE
            starts_mask = np.zeros(len(codes), dtype=bool)
            starts_mask[offsets[lengths > 0]] = True
            starts_mask[1:] |= is_space[:-1]
            word_starts = np.flatnonzero(starts_mask)
            word_ends = np.sort(np.concatenate([np.flatnonzero(is_space), (offsets + lengths)[lengths > 0]]))
            first_word = np.searchsorted(word_starts, offsets)
            units = np.diff(np.append(first_word, len(word_starts)))  # words per piece
            unit_start = first_word
        whole = units < n
        count = np.where(whole, 1, units - n + 1)
        piece = np.repeat(np.arange(len(lengths)), count)
        local = np.arange(len(piece)) - np.repeat(np.cumsum(count) - count, count)
        first = np.repeat(unit_start, count) + local  # first unit of each shingle
        if not self.words:
            starts = first
            ends = first + n
        else:
            last = np.minimum(first + n - 1, len(word_ends) - 1)
            starts = word_starts[np.minimum(first, len(word_starts) - 1)] if len(word_starts) else first
            ends = word_ends[last] if len(word_ends) else first
        whole_shingle = whole[piece]
        starts = np.where(whole_shingle, offsets[piece], starts)
        ends = np.where(whole_shingle, (offsets + lengths)[piece], ends)
        return starts, ends, piece

    def _hash_spans(self, codes: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """64-bit hash of each span: fmix64(sum_t code[s+t] * base^t + length * key ^ seed key)."""
        total = len(codes)
        prefix = np.zeros(total + 1, dtype=np.uint64)
        np.cumsum(codes.astype(np.uint64) * _powers(self._base, total), out=prefix[1:])
        raw = (prefix[ends] - prefix[starts]) * _powers(self._base_inverse, total + 1)[starts]
        raw += (ends - starts).astype(np.uint64) * self._length_key
        raw ^= self._shingle_key
        return fmix64(raw)

    def _shingle_batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(64-bit shingle hashes, owning document index) in document order, batch by batch."""
        for pieces, owners in self._batches(texts):
            joined = "".join(pieces).encode("utf-32-le", "surrogatepass")
            codes = np.frombuffer(joined, dtype="<u4")
            lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
            starts, ends, piece = self._spans(codes, lengths)
            yield self._hash_spans(codes, starts, ends), np.asarray(owners, dtype=np.int64)[piece]

    def shingle_sets(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's shingles as a sorted array of unique 64-bit hashes."""
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for hashes, owners in self._shingle_batches(texts):
            docs, first = np.unique(owners, return_index=True)
            for doc, chunk in zip(docs, np.split(hashes, first[1:])):
                parts[doc].append(chunk)
        return [_sorted_unique(np.concatenate(p)) if p else np.empty(0, np.uint64) for p in parts]

    # -- signatures -----------------------------------------------------------------------

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(documents, num_perm) uint32 MinHash signatures."""
        return self.signatures_and_sizes(texts)[0]

    def signatures_and_sizes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The signatures, and each text's shingle count (repeats included: an upper bound of
        its distinct shingles, which is what verification holds per candidate)."""
        signatures = np.full((len(texts), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        sizes = np.zeros(len(texts), dtype=np.int64)
        width = max(1, _BLOCK_VALUES // self.num_perm)
        # permutations x shingles: each permutation's values are contiguous, so the minima
        # are contiguous reductions (several times faster than reducing along columns)
        block = np.empty((self.num_perm, width), dtype=np.uint32)
        a, b = self._a[:, None], self._b[:, None]
        for hashes, owners in self._shingle_batches(texts):
            sizes += np.bincount(owners, minlength=len(texts))
            keys = (hashes >> np.uint64(32)).astype(np.uint32)
            for column in range(0, len(keys), width):
                x, owner = keys[column : column + width], owners[column : column + width]
                values = block[:, : len(x)]
                np.multiply(a, x, out=values)
                values += b
                # owners are sorted: one segment per document in this block
                segment = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
                docs = owner[segment]
                minima = values.min(axis=1)[None, :] if len(segment) == 1 else np.minimum.reduceat(values, segment, axis=1).T
                signatures[docs] = np.minimum(signatures[docs], minima)
        return signatures, sizes

    def band_hashes(self, signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
        """(documents, bands) uint64: a hash of each band's rows, keyed by the band's index,
        so equal rows in different bands never share a bucket."""
        if bands * rows > signatures.shape[1]:
            raise ValueError(f"{bands} bands x {rows} rows need {bands * rows} permutations, have {signatures.shape[1]}")
        values = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
        keys = fmix64(np.arange(bands, dtype=np.uint64) + np.uint64(self._band_seed))
        hashes = np.broadcast_to(keys, (len(signatures), bands)).copy()
        for row in range(rows):
            hashes ^= values[:, :, row]
            fmix64(hashes)
        return hashes


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is slower for these sizes)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of unique values."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) > len(b):
        a, b = b, a
    found = np.searchsorted(b, a)
    inter = int(np.count_nonzero(b[np.minimum(found, len(b) - 1)] == a)) if len(b) else 0
    return inter / (len(a) + len(b) - inter)
