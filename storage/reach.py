"""Local folders that several nodes must share: a marker written on one node, looked for on all.

A local path (or file://) means the same folder on every node only on a file system they all
mount. Before such a path is trusted by several nodes, one process writes a marker with a random
name into each folder (`place_markers`), then every node looks for them (`missing_markers`): a
node that does not find one has a folder of its own at that path, or none, and the path is
refused with one line naming its config key. Store URIs (s3://) need no check.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MARKER_PREFIX = ".tinyllama-reach-"
TOKEN_BYTES = 7  # a marker's random name, small enough to send as one int64 between ranks
ADVICE = "use s3:// (or a file system every node mounts at that path)"


class Unreachable(ValueError):
    """A local path that not every node reaches: bad config, refused before anything runs."""


def local_path(uri: str) -> Path | None:
    """The local path of a plain path or file:// URI; None for a remote store."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return Path(uri).expanduser().absolute()
    return Path(rest) if scheme == "file" else None


@dataclass(frozen=True)
class SharedPath:
    """A config key's local path that every node must reach, and the folder its marker goes in."""

    key: str  # e.g. "output", "data.0.manifest"
    uri: str
    folder: Path
    output: bool = False  # created when missing (the job writes there anyway)

    @classmethod
    def of(cls, key: str, uri: str, *, is_file: bool = False, output: bool = False) -> SharedPath | None:
        """The folder of a local `uri` (its parent when it names a file); None for a remote store."""
        path = local_path(uri)
        if path is None:
            return None
        return cls(key, uri, path.parent if is_file else path, output)

    def marker(self, token: str) -> Path:
        return self.folder / f"{MARKER_PREFIX}{token}"

    def refusal(self, nodes: str) -> Unreachable:
        return Unreachable(f"{self.key} {self.uri}: a local path not found from every node of {nodes}; {ADVICE}")


def place_markers(paths: list[SharedPath]) -> str:
    """Write one marker (a new random name) into each path's folder; returns the name's token.
    A folder that cannot take it (read-only, say) cannot be checked, and is refused."""
    token = secrets.token_hex(TOKEN_BYTES)
    for path in paths:
        try:
            if path.output:
                path.folder.mkdir(parents=True, exist_ok=True)
            path.marker(token).touch()
        except OSError as error:
            remove_markers(paths, token)
            raise Unreachable(
                f"{path.key} {path.uri}: cannot write a marker into {path.folder} to check that every node reaches "
                f"it ({error.strerror or error}); {ADVICE}"
            ) from None
    return token


def missing_markers(paths: list[SharedPath], token: str) -> list[int]:
    """Indexes of the paths whose marker this node does not see."""
    return [i for i, path in enumerate(paths) if not path.marker(token).exists()]


def remove_markers(paths: list[SharedPath], token: str) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path.marker(token))


@contextlib.contextmanager
def markers(paths: list[SharedPath]) -> Iterator[str]:
    """Markers in every path's folder while the block runs (then removed); yields their token."""
    token = place_markers(paths)
    try:
        yield token
    finally:
        remove_markers(paths, token)
