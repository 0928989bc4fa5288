"""Reading a lease as a bystander does: what a test checks about who holds it."""

from __future__ import annotations

from storage.lease import LeaseRecord
from storage.store import Store


def read_lease(store: Store, key: str) -> LeaseRecord | None:
    """The lease at `key`, or None if nobody holds it."""
    current = store.get_versioned(key)
    return None if current is None else LeaseRecord.model_validate_json(current[0])
