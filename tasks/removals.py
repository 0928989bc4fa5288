"""The document ids that the dedup stages removed from one docs shard."""

from __future__ import annotations

import numpy as np

from storage.store import Store
from tasks import exact_dedup, near_dedup
from tasks.plan import PlannedFile


def removed_ids(store: Store, file: PlannedFile) -> np.ndarray:
    """Sorted unique ids removed by exact or near dedup (empty when neither ran)."""
    return np.union1d(exact_dedup.removed_ids(store, file), near_dedup.removed_ids(store, file))
