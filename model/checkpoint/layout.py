"""A run's checkpoints on the store, by the page and without torch: COMMIT markers, discovery
(newest first from one folder listing), pruning (batched deletes), setting corrupt ones aside.

    <run>/checkpoints/step-0000040/
        __0_0.distcp, __1_0.distcp ...  torch.distributed.checkpoint (DCP) shards: each rank's model
                                        shards and values
        __0_optimizer_0.distcp ...      and, in files of their own, each rank's optimizer shards
        .metadata                       DCP's index of every tensor chunk and value (coordinator)
        COMMIT                          written last: the step and every file's size and sha256

A folder without a COMMIT is the leftover of a crashed save: the next save of its step, or a
prune once it is older than the `keep` newest, deletes it. A folder with one is a committed
checkpoint, complete if every file it lists is there at its size, else corrupt: evidence, never
deleted nor overwritten, and set aside under `step-NNNNNNN.corrupt-<UTC time>` (out of the names
that resumes, prunes and saves use) once a resume has passed it by.

Neither a resume nor a save's prune reads more than the folders it takes: the step folders come
from one delimiter listing, a resume then lists and reads folders newest first until one is
complete (then verifies its sha256s), and a prune trusts the `keep` newest by their step and reads
only the folders it deletes. Their requests do not grow with the number of checkpoints kept.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from storage.manifest import ObjectInfo, Record, read_record, write_record
from storage.run_layout import COMMIT, RunLayout
from storage.store import ObjectNotFound, Store, join_key, open_store

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
LEGACY_MODEL_FILE = "model.safetensors"  # the full-state format of earlier versions
OPTIMIZER_KEY = "optimizer"  # its entries go to files of their own (_ModelApartWriter)
PRUNE_THREADS = 16  # folders listed and COMMITs read at once, when a prune deletes several


class CheckpointError(ValueError):
    """A checkpoint is unusable (corrupt, unsafe, or from an incompatible run); the message names it.
    A ValueError: it fails the same way on every try, so the training job is not retried."""


class CommitMarker(Record):
    step: int
    files: list[ObjectInfo]  # keys relative to the checkpoint folder


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: `prefix` is its folder's key in the run store."""

    step: int
    prefix: str
    files: tuple[ObjectInfo, ...]

    def key(self, name: str) -> str:
        return join_key(self.prefix, name)

    @property
    def is_legacy(self) -> bool:
        names = {f.key for f in self.files}
        return LEGACY_MODEL_FILE in names and METADATA_FILE not in names


@dataclass(frozen=True)
class CorruptCheckpoint:
    """A committed checkpoint whose files are not what its COMMIT lists: evidence, never loaded nor deleted."""

    step: int
    prefix: str
    problem: str  # names the file and what differs



def commit_checkpoint(store: Store, step: int, files: list[ObjectInfo]) -> Checkpoint:
    """Write the COMMIT marker of the step's folder, whose `files` (relative keys) are already there."""
    prefix = RunLayout.checkpoint(step)
    infos = sorted(files, key=lambda f: f.key)
    write_record(store, RunLayout.commit_marker(prefix), CommitMarker(step=step, files=infos))
    return Checkpoint(step, prefix, tuple(infos))


def read_committed(store: Store, step: int, prefix: str, sizes: dict[str, int]) -> Checkpoint | CorruptCheckpoint | None:
    """The checkpoint in `prefix`: complete if its COMMIT lists files present at their sizes
    (`sizes`: every key under the folder, from one listing), corrupt if not, None without a COMMIT."""
    marker_key = RunLayout.commit_marker(prefix)
    if marker_key not in sizes:
        return None
    try:
        marker = read_record(store, marker_key, CommitMarker)
    except ObjectNotFound:  # deleted since the listing
        return None
    except ValidationError as e:
        return CorruptCheckpoint(step, prefix, f"{store.url(marker_key)}: unreadable COMMIT marker "
                                 f"({e.error_count()} errors, the first: {e.errors()[0]['msg']})")
    if marker.step != step:
        return CorruptCheckpoint(step, prefix, f"{store.url(marker_key)}: names step {marker.step}")
    for info in marker.files:
        size = sizes.get(join_key(prefix, info.key))
        if size != info.size:
            found = "missing" if size is None else f"{size} bytes"
            return CorruptCheckpoint(step, prefix, f"{store.url(join_key(prefix, info.key))}: {found}, "
                                     f"its COMMIT lists {info.size} bytes")
    return Checkpoint(step, prefix, tuple(marker.files))


def folder_sizes(store: Store, prefix: str) -> dict[str, int]:
    return {listed.key: listed.size for listed in store.list_info(prefix + "/")}


def committed_checkpoints(store: Store) -> Iterator[Checkpoint | CorruptCheckpoint]:
    """The committed checkpoints of a run store, newest first: complete, or corrupt by the listing.
    Lazy: one folder listing, then a listing of its files and a GET of its COMMIT per folder taken,
    so finding the newest costs the same with 1 or 1,000 checkpoints kept."""
    for step in reversed(RunLayout(store).checkpoint_steps()):
        prefix = RunLayout.checkpoint(step)
        if (found := read_committed(store, step, prefix, folder_sizes(store, prefix))) is not None:
            yield found


def complete_checkpoints(store: Store) -> list[Checkpoint]:
    """Every complete checkpoint of a run store, newest first (their sha256s not checked)."""
    complete = []
    for found in committed_checkpoints(store):
        if isinstance(found, CorruptCheckpoint):
            log.warning("ignoring corrupt checkpoint %s: %s", store.url(found.prefix), found.problem)
        else:
            complete.append(found)
    return complete


def latest_checkpoint(store: Store) -> Checkpoint | None:
    """The newest complete checkpoint (its sha256s not checked), reading COMMITs newest first until one is."""
    return next((c for c in committed_checkpoints(store) if isinstance(c, Checkpoint)), None)


def delete_folders(store: Store, files: dict[str, list[str]]) -> None:
    """Delete checkpoint folders (prefix -> its keys) in batches: every COMMIT first, so a
    half-deleted checkpoint never looks complete; then the emptied folders themselves, so that
    no step listing names them again."""
    commits = {RunLayout.commit_marker(prefix): None for prefix in files}  # a set, in order
    store.delete_many(commits)
    store.delete_many(key for keys in files.values() for key in keys if key not in commits)
    store.remove_folders(files)


def prune_checkpoints(store: Store, keep: int | None, newest: int | None = None) -> list[int]:
    """Keep the folders of the newest `keep` steps up to the newest complete checkpoint (`newest`:
    the step a save has just committed; found by discovery if not given) and delete the older ones:
    complete checkpoints and the leftovers of crashed saves, never a corrupt checkpoint. Folders
    newer than `newest` (a save in flight) are not touched. Returns the deleted steps.

    The kept folders are trusted by their step, not read: a leftover or a corrupt checkpoint among
    them takes a place until it is old enough to go (a resume verifies what it loads). So a prune
    costs one folder listing, then a listing and a COMMIT GET per folder deleted, and batched
    deletes: nothing grows with `keep`. With `keep` null everything is kept, at no request."""
    if keep is None:
        return []
    if newest is None:
        if (found := latest_checkpoint(store)) is None:
            return []
        newest = found.step
    older = [step for step in reversed(RunLayout(store).checkpoint_steps()) if step <= newest][keep:]
    with ThreadPoolExecutor(max(1, min(PRUNE_THREADS, len(older)))) as pool:
        doomed = {step: keys for step, keys in zip(older, pool.map(lambda step: _deletable(store, step), older))
                  if keys is not None}
    delete_folders(store, {RunLayout.checkpoint(step): keys for step, keys in doomed.items()})
    return sorted(doomed)


def _deletable(store: Store, step: int) -> list[str] | None:
    """The keys of the step's folder, or None if it holds a corrupt checkpoint: evidence, kept."""
    prefix = RunLayout.checkpoint(step)
    sizes = folder_sizes(store, prefix)
    if isinstance(found := read_committed(store, step, prefix, sizes), CorruptCheckpoint):
        log.warning("not pruning corrupt checkpoint %s: %s", store.url(prefix), found.problem)
        return None
    return list(sizes)


def set_aside(store: Store, corrupt: CorruptCheckpoint, staging_dir: Path | None = None) -> str:
    """Move a corrupt checkpoint's folder, files unchanged, out of the names that resumes, prunes
    and saves use (RunLayout.corrupt_checkpoint); returns its new URI. A local folder is renamed;
    on another store each object is copied (COMMIT last) before the folder is deleted (COMMIT
    first), so an interrupted move leaves the evidence whole in one place or the other."""
    target = RunLayout.corrupt_checkpoint(corrupt.step, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    if (folder := store.local_path(corrupt.prefix)) is not None:
        folder.rename(store.local_path(target))
        return store.url(target)
    marker = RunLayout.commit_marker(corrupt.prefix)
    keys = sorted(store.list(corrupt.prefix + "/"), key=lambda key: key == marker)
    if staging_dir is not None:
        staging_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_dir) as scratch:
        for key in keys:
            copy = store.download(key, Path(scratch, "object"))
            store.put_file(join_key(target, key.removeprefix(corrupt.prefix + "/")), copy)
            copy.unlink()
    delete_folders(store, {corrupt.prefix: keys})
    return store.url(target)



def resolve_checkpoint(uri: str) -> tuple[RunLayout, Checkpoint]:
    """A checkpoint folder URI, or a run folder URI meaning its newest complete checkpoint."""
    store = open_store(uri)
    if store.exists(COMMIT):  # a checkpoint folder: view it from its run folder
        split = RunLayout.split_checkpoint_uri(uri)
        if split is None:
            raise CheckpointError(f"{uri}: a checkpoint folder must be <run>/checkpoints/step-NNNNNNN")
        layout, step = RunLayout.at(split[0]), split[1]
        prefix = RunLayout.checkpoint(step)
        checkpoint = read_committed(layout.store, step, prefix, folder_sizes(layout.store, prefix))
        if isinstance(checkpoint, CorruptCheckpoint):
            raise CheckpointError(f"{uri}: corrupt checkpoint: {checkpoint.problem}")
        return layout, checkpoint
    checkpoint = latest_checkpoint(store)
    if checkpoint is None:
        raise CheckpointError(f"{uri}: neither a checkpoint folder (no {COMMIT}) nor a run with a complete checkpoint")
    return RunLayout(store), checkpoint
