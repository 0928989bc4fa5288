"""Locality-sensitive hashing over MinHash bands: parameters, buckets, candidate edges.

Documents whose signatures agree on every row of some band share that band's bucket and
become candidates. A bucket links each member to its smallest id (a star, not all pairs),
which is all connected components need. With verification on, a candidate is linked only
after its true Jaccard similarity is checked (see `verified_edges`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from tasks.near_dedup.components import runs, unique_pairs


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of unique values."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) > len(b):
        a, b = b, a
    found = np.searchsorted(b, a)
    inter = int(np.count_nonzero(b[np.minimum(found, len(b) - 1)] == a)) if len(b) else 0
    return inter / (len(a) + len(b) - inter)


def candidate_probability(similarity: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """P(two documents of this Jaccard similarity share at least one band bucket)."""
    return 1.0 - (1.0 - similarity**rows) ** bands


@lru_cache(maxsize=64)
def optimal_bands_rows(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows) with bands * rows <= num_perm minimizing the equally weighted area of false
    positives (similarity below the threshold, yet candidates) and false negatives (above,
    yet not candidates); the criterion of datasketch's `_optimal_param`."""
    below = np.linspace(0.0, threshold, 1001)
    above = np.linspace(threshold, 1.0, 1001)
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = np.trapezoid(candidate_probability(below, bands, rows), below)
            false_negative = np.trapezoid(1.0 - candidate_probability(above, bands, rows), above)
            error = 0.5 * false_positive + 0.5 * false_negative
            if best is None or error < best[0]:
                best = (error, bands, rows)
    assert best is not None
    return best[1], best[2]


def group_buckets(hashes: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Buckets with two or more members: (member ids, bucket start offsets).

    Members are sorted by (band hash, id), so each bucket's first member is its smallest id.
    Band hashes already include the band's index, so a hash alone names a bucket.
    """
    hashes, ids = unique_pairs(hashes, ids)
    starts, _ = runs(hashes)
    sizes = bucket_sizes(starts, len(ids))
    return _select(ids, sizes, sizes >= 2)


def bucket_sizes(starts: np.ndarray, members: int) -> np.ndarray:
    """The number of members of each bucket, from the buckets' start offsets."""
    return np.diff(np.append(starts, members))


def _select(members: np.ndarray, sizes: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The buckets where `keep` is true: (their members, their start offsets)."""
    starts = np.cumsum(np.concatenate([[0], sizes[keep]]))[:-1]
    return members[np.repeat(keep, sizes)], starts.astype(np.int64)


def distinct_buckets(members: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop buckets whose member set repeats an earlier one (near-duplicates often share
    several bands); a bucket is fingerprinted by its size and the wrapping sum of its
    members' mixed ids."""
    if len(starts) == 0:
        return members, starts
    sizes = bucket_sizes(starts, len(members))
    from tasks.near_dedup import minhash  # numba loads in the workers, not the driver

    mixed = minhash.fmix64(members.astype(np.uint64))
    fingerprints = np.add.reduceat(mixed, starts)
    _, first = np.unique(np.stack([fingerprints, sizes.astype(np.uint64)], axis=1), axis=0, return_index=True)
    keep = np.zeros(len(starts), dtype=bool)
    keep[first] = True
    return _select(members, sizes, keep)


def star_edges(members: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unverified edges: every member of a bucket to the bucket's smallest id."""
    smallest = np.repeat(members[starts], bucket_sizes(starts, len(members)))
    linked = members != smallest
    return members[linked], smallest[linked]


def verified_edges(
    members: np.ndarray,
    starts: np.ndarray,
    similarity: Callable[[int, int], float],
    threshold: float,
    anchors: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Edges between bucket members whose true Jaccard similarity reaches the threshold.

    Linking each member only to the bucket's smallest id would miss members that resemble
    another member but not the smallest. So each bucket keeps up to `anchors` anchors: its
    smallest id first, then every member that resembled no anchor so far. Each member is
    compared with every anchor and linked to each one it resembles, which joins groups that
    meet only through it. At most `anchors` comparisons per member keep boilerplate buckets
    (thousands of members) linear; a member that resembles none of a full anchor list stays
    unlinked here, which can only keep a document, never remove a dissimilar one.
    Returns (member, anchor) edges and the number of comparisons made.
    """
    sources: list[int] = []
    targets: list[int] = []
    comparisons = 0
    bounds = np.append(starts, len(members)).tolist()
    ids = members.tolist()
    for begin, end in zip(bounds[:-1], bounds[1:]):
        bucket_anchors = [ids[begin]]
        for member in ids[begin + 1 : end]:
            matched = False
            for anchor in bucket_anchors:
                comparisons += 1
                if similarity(member, anchor) >= threshold:
                    sources.append(member)
                    targets.append(anchor)
                    matched = True
            if not matched and len(bucket_anchors) < anchors:
                bucket_anchors.append(member)
    return np.array(sources, dtype=np.int64), np.array(targets, dtype=np.int64), comparisons
