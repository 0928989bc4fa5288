"""MinHash signatures and shingle sets over batches of documents, with numba kernels for the
per-character work (no per-shingle Python work).

A signature is a pure function of the text and the config (n-gram size, shingle kind,
permutations, seed): every constant below is fixed, the per-seed parameters come from a
hand-written splitmix64 stream (not numpy's generators, whose streams may change between
versions), and only wrapping integer arithmetic is used. No Python `hash()`.

Pipeline per document (SlimPajama's recipe by default):
1. normalize: lowercase, drop ASCII punctuation, collapse whitespace runs to one space and
   strip (SlimPajama's `get_features`);
2. shingles: character n-grams (of code points), or word n-grams (words are the
   space-separated tokens); a text shorter than one n-gram is a single shingle (the whole
   normalized text);
3. each shingle hashes to 64 bits: a polynomial hash of its code points (computed for all
   shingles at once from prefix sums), plus its length, finalized by murmur3's fmix64;
4. permutation i maps the top 32 bits x of a shingle hash to (a_i * x + b_i) mod 2^32
   (a_i odd: a bijection), and signature value i is the minimum over the document's
   shingles. 32-bit arithmetic packs twice the SIMD lanes of 64-bit, and 32-bit minima are
   what datasketch (hence SlimPajama) keeps as well; the Jaccard estimates match the
   binomial error of ideal permutations (see tests).

Documents are processed in batches of about PIECE_CHARS code points laid end to end. An
ASCII text is lowercased and loses its punctuation in one bytes.translate (any other text
goes through `normalize`); compiled kernels then collapse the batch's runs of spaces, hash
every character n-gram with a rolling polynomial hash (word n-grams: numpy prefix sums), and
take each document's minimum under every permutation, the permutations innermost so that
they run in SIMD lanes. The kernels are compiled on first use and cached on disk
(numba's cache=True: next to this file, or in the user's cache directory where that is
read-only; NUMBA_CACHE_DIR overrides), so a worker pays the compilation once, not per task.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numba
import numpy as np

_MASK64 = (1 << 64) - 1
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_PUNCTUATION_BYTES = string.punctuation.encode()
_ASCII_WHITESPACE = bytes(c for c in range(128) if chr(c).isspace())  # str.split()'s, \x1c-\x1f too
_TO_SPACE = bytes.maketrans(_ASCII_WHITESPACE, b" " * len(_ASCII_WHITESPACE))
_SPACE = 32
_SHIFT32, _SHIFT33 = np.uint64(32), np.uint64(33)
PIECE_CHARS = 1 << 18  # texts are shingled in batches of about this many code points
PIECE_WORDS = 1 << 17  # a longer text is cut into overlapping pieces of this many words


def normalize(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace to single spaces, strip."""
    if text.isascii():
        return " ".join(_spaced(text).split())
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def _spaced(text: str) -> str:
    """An ASCII text lowercased, without punctuation, each whitespace character a space:
    `normalize` but for collapsing the spaces (one bytes.translate, a table lookup per byte)."""
    return text.encode().lower().translate(_TO_SPACE, _PUNCTUATION_BYTES).decode()


@numba.njit(cache=True, nogil=True)
def _collapse_spaces(codes: np.ndarray, lengths: np.ndarray, strip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pieces laid end to end with each run of spaces made one space, and the pieces marked
    `strip` without spaces at either end (the others are normalized already and may begin or
    end with a space where a long text was cut); the codes and lengths after."""
    out = np.empty_like(codes)
    kept = np.empty_like(lengths)
    size, start = 0, 0
    for piece in range(len(lengths)):
        first = size
        after_space = strip[piece]  # a stripped piece's leading spaces all go
        for code in codes[start : start + lengths[piece]]:
            if code != _SPACE or not after_space:
                out[size] = code
                size += 1
            after_space = code == _SPACE
        if strip[piece] and size > first and out[size - 1] == _SPACE:
            size -= 1
        kept[piece] = size - first
        start += lengths[piece]
    return out[:size], kept


@numba.njit(cache=True, nogil=True)
def _char_shingle_hashes(codes, lengths, n, base, base_inverse, length_key, shingle_key):
    """fmix64-finalized hashes of the character n-grams of pieces laid end to end, piece by
    piece, and each piece's shingle count (a piece shorter than n is one shingle: itself).
    A window's hash sum_t code[s+t] * base^t moves on by one subtraction, one multiplication
    by base's inverse and one addition, exactly (arithmetic mod 2^64)."""
    hashes = np.empty(len(codes) + len(lengths), dtype=np.uint64)
    counts = np.empty(len(lengths), dtype=np.int64)
    top_power = np.uint64(1)
    for _ in range(n - 1):
        top_power *= base
    size, start = 0, 0
    for piece in range(len(lengths)):
        length = lengths[piece]
        window = min(length, n)
        h, power = np.uint64(0), np.uint64(1)
        for t in range(window):
            h += np.uint64(codes[start + t]) * power
            power *= base
        counts[piece] = max(length - n + 1, 1)
        for s in range(start, start + counts[piece]):
            hashes[size] = fmix64((h + np.uint64(window) * length_key) ^ shingle_key)
            size += 1
            if s + n < start + length:
                h = (h - np.uint64(codes[s])) * base_inverse + np.uint64(codes[s + n]) * top_power
        start += length
    return hashes[:size], counts


@numba.njit(cache=True, nogil=True)
def _min_permutations(hashes, firsts, docs, a, b, signatures):
    """signatures[docs[d]] lowered to the minimum, under each permutation, of the top 32 bits of
    hashes[firsts[d]:firsts[d+1]] (the last document's run ends with the hashes)."""
    row = np.empty(len(a), dtype=np.uint32)
    for d in range(len(firsts)):
        end = firsts[d + 1] if d + 1 < len(firsts) else len(hashes)
        row[:] = signatures[docs[d]]
        for j in range(firsts[d], end):
            x = np.uint32(hashes[j] >> _SHIFT32)
            for i in range(len(a)):
                row[i] = min(row[i], np.uint32(a[i] * x + b[i]))
        signatures[docs[d]] = row


def splitmix64(seed: int) -> Iterator[int]:
    """The splitmix64 stream: stable 64-bit parameters from a seed."""
    state = seed & _MASK64
    while True:
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        yield z ^ (z >> 31)


@numba.vectorize(["uint64(uint64)"], cache=True)
def fmix64(h):
    """murmur3's 64-bit finalizer: a ufunc on uint64 arrays (`out=` for in place), and a
    function of one uint64 inside the kernels."""
    h ^= h >> _SHIFT33
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> _SHIFT33
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _SHIFT33)


@lru_cache(maxsize=8)
def _power_table(base: int, count: int) -> np.ndarray:
    """base**t mod 2^64 for t in [0, count), read-only (shared by the batches of a process)."""
    powers = np.full(count, base, dtype=np.uint64)
    powers[:1] = 1
    np.cumprod(powers, out=powers)
    powers.flags.writeable = False
    return powers


def _powers(base: int, count: int) -> np.ndarray:
    """base**t mod 2^64 for t in [0, count), from a table sized to the next power of two."""
    return _power_table(base, 1 << max(count - 1, 1).bit_length())[:count]


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
        every shingle lies whole inside exactly one piece."""
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

    def _batches(self, texts: Sequence[str]) -> Iterator[tuple[list[str], list[int], list[bool]]]:
        """(pieces, owning document of each piece, whether its spaces are still to collapse),
        about PIECE_CHARS code points at a time. An ASCII text that fits one piece is only
        `_spaced` here; any other is normalized, and cut if long."""
        pieces: list[str] = []
        owners: list[int] = []
        spaced: list[bool] = []
        size = 0
        for doc, text in enumerate(texts):
            short_ascii = len(text) <= PIECE_CHARS and text.isascii()
            for piece in [_spaced(text)] if short_ascii else self._pieces(normalize(text)):
                pieces.append(piece)
                owners.append(doc)
                spaced.append(short_ascii)
                size += len(piece)
                if size >= PIECE_CHARS:
                    yield pieces, owners, spaced
                    pieces, owners, spaced, size = [], [], [], 0
        if pieces:
            yield pieces, owners, spaced

    def _prefix(self, codes: np.ndarray) -> np.ndarray:
        """prefix[k] = sum_{t<k} code[t] * base^t mod 2^64, for k in [0, len(codes)]."""
        prefix = np.empty(len(codes) + 1, dtype=np.uint64)
        prefix[0] = 0
        np.multiply(codes, _powers(self._base, len(codes)), out=prefix[1:])
        np.cumsum(prefix[1:], out=prefix[1:])
        return prefix

    def _span_hashes(self, prefix: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Unfinalized hash of each [start, end) span: sum_t code[s+t] * base^t + length * key."""
        raw = (prefix[ends] - prefix[starts]) * _powers(self._base_inverse, len(prefix))[starts]
        raw += (ends - starts).astype(np.uint64) * self._length_key
        return raw

    def _word_spans(self, codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[start, end) code-point spans of every word n-gram of pieces laid end to end, and
        each piece's shingle count. A piece shorter than one n-gram is one span: the whole piece."""
        n = self.ngram
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        is_space = codes == _SPACE
        starts_mask = np.zeros(len(codes), dtype=bool)
        starts_mask[offsets[lengths > 0]] = True
        starts_mask[1:] |= is_space[:-1]
        word_starts = np.flatnonzero(starts_mask)
        word_ends = np.sort(np.concatenate([np.flatnonzero(is_space), (offsets + lengths)[lengths > 0]]))
        first_word = np.searchsorted(word_starts, offsets)
        units = np.diff(np.append(first_word, len(word_starts)))  # words per piece
        whole = units < n
        count = np.where(whole, 1, units - n + 1)
        piece = np.repeat(np.arange(len(lengths)), count)
        local = np.arange(len(piece)) - np.repeat(np.cumsum(count) - count, count)
        first = np.repeat(first_word, count) + local  # first word of each shingle
        last = np.minimum(first + n - 1, len(word_ends) - 1)
        starts = word_starts[np.minimum(first, len(word_starts) - 1)] if len(word_starts) else first
        ends = word_ends[last] if len(word_ends) else first
        whole_shingle = whole[piece]
        starts = np.where(whole_shingle, offsets[piece], starts)
        ends = np.where(whole_shingle, (offsets + lengths)[piece], ends)
        return starts, ends, count

    def _shingle_batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(shingle hashes in document order, the documents present, the index of each one's
        first hash), batch by batch; every present document has at least one shingle."""
        for pieces, owners, spaced in self._batches(texts):
            joined = "".join(pieces)
            if joined.isascii():
                codes = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
            else:
                codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
            codes, lengths = _collapse_spaces(codes, lengths, np.array(spaced))
            if self.words:
                starts, ends, counts = self._word_spans(codes, lengths)
                hashes = self._span_hashes(self._prefix(codes), starts, ends)
                hashes ^= self._shingle_key
                fmix64(hashes, out=hashes)
            else:
                hashes, counts = _char_shingle_hashes(
                    codes, lengths, self.ngram, np.uint64(self._base), np.uint64(self._base_inverse), self._length_key, self._shingle_key
                )
            owner = np.asarray(owners, dtype=np.int64)
            new_doc = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))  # a long text's pieces are adjacent
            yield hashes, owner[new_doc], (np.cumsum(counts) - counts)[new_doc]

    def shingle_sets(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's shingles as a sorted array of unique 64-bit hashes."""
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for hashes, docs, firsts in self._shingle_batches(texts):
            for doc, chunk in zip(docs, np.split(hashes, firsts[1:])):
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
        for hashes, docs, firsts in self._shingle_batches(texts):
            sizes[docs] += np.diff(np.append(firsts, len(hashes)))
            _min_permutations(hashes, firsts, docs, self._a, self._b, signatures)
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
            fmix64(hashes, out=hashes)
        return hashes


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is slower for these sizes)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])]
