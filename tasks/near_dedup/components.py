"""Connected components by alternating large-star and small-star (Kiveris et al., "Connected
Components in MapReduce and Beyond", SoCC 2014), one vertex partition at a time.

The edge set is rewritten round by round; each step groups edges by one endpoint, so a
task needs only the edges of its own vertex partition, never the whole graph. It converges
in O(log^2 n) rounds to one star per component whose center is the component's smallest
id: every other member has exactly one edge, to that center. Ids sort in plan order, so the
center is the document kept and the result does not depend on how the work was split.

- large-star, grouped by vertex u (edges in both directions): with m the smallest of u and
  its neighbors, every neighbor v > u is re-linked to m.
- small-star, grouped by the larger endpoint u: with m the smallest neighbor below u, u and
  every other neighbor below u are re-linked to m.

A step reports how many edges it changed; when a whole round changes none, every vertex has
at most one smaller neighbor and no vertex with a smaller neighbor has a larger one, which
is exactly "a star centered at the minimum" per component.
"""

from __future__ import annotations

import numpy as np



def partition_of(ids: np.ndarray, partitions: int) -> np.ndarray:
    """The vertex partition of each id: a mixed hash, so big clusters spread evenly."""
    from tasks.near_dedup import minhash  # numba loads in the workers, not the driver

    return (minhash.fmix64(ids.astype(np.uint64)) % np.uint64(partitions)).astype(np.int64)


def unique_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (first, second) pairs, sorted by first then second."""
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    fresh = np.ones(len(first), dtype=bool)
    fresh[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return first[fresh], second[fresh]


def runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offset of each run of equal sorted keys, and each row's run index."""
    fresh = np.ones(len(keys), dtype=bool)
    fresh[1:] = keys[1:] != keys[:-1]
    return np.flatnonzero(fresh), np.cumsum(fresh) - 1


def large_star(vertex: np.ndarray, neighbor: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One large-star step over the edges of some vertices, given in both directions.

    Returns the new edges as (larger, smaller) pairs and how many of them changed.
    """
    vertex, neighbor = unique_pairs(vertex, neighbor)
    starts, run = runs(vertex)
    smallest = np.minimum(vertex[starts], neighbor[starts])[run]  # neighbors sorted: first is least
    upward = neighbor > vertex
    changed = int(np.count_nonzero(upward & (smallest < vertex)))
    return neighbor[upward], smallest[upward], changed


def small_star(larger: np.ndarray, smaller: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """One small-star step over (larger, smaller) edges grouped by their larger endpoint.

    Returns the new edges as (larger, smaller) pairs and how many of them changed.
    """
    larger, smaller = unique_pairs(larger, smaller)
    starts, run = runs(larger)
    center = smaller[starts][run]  # the least neighbor below each vertex
    others = smaller != center
    new_larger = np.concatenate([larger[starts], smaller[others]])
    new_smaller = np.concatenate([center[starts], center[others]])
    return new_larger, new_smaller, int(np.count_nonzero(others))
