"""What datatrove 0.10.1 needs to run beside this project's pins (benchmarks only)."""

from __future__ import annotations

import xxhash


def xxhash64(data: str | bytes) -> int:
    """datatrove 0.10.1's xxhash64, which hands str to xxhash: xxhash 4.x (this project's pin)
    refuses str. A module-level function, so that datatrove's worker processes unpickle it."""
    return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
