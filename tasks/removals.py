"""The document ids that the dedup stages removed from one docs shard."""

from __future__ import annotations

import numpy as np

from storage.store import Store
from tasks.exact_dedup import exact_duplicate_ids
from tasks.near_dedup import near_duplicate_ids
from tasks.plan import PlannedFile


def deduplicated_ids(store: Store, file: PlannedFile) -> np.ndarray:
    """Sorted unique ids removed by exact or near dedup (empty when neither ran)."""
    return np.union1d(exact_duplicate_ids(store, file), near_duplicate_ids(store, file))
