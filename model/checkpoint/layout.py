"""A run's checkpoints on the store, by the page and without torch: COMMIT markers, discovery
(newest first, one listing), pruning (batched deletes), setting corrupt ones aside.

    <run>/checkpoints/step-0000040/
        __0_0.distcp, __1_0.distcp ...  torch.distributed.checkpoint (DCP) shards: each rank's model
                                        shards and values
        __0_optimizer_0.distcp ...      and, in files of their own, each rank's optimizer shards
        .metadata                       DCP's index of every tensor chunk and value (coordinator)
        COMMIT                          written last: the step and every file's size and sha256

A folder without a COMMIT is the leftover of a crashed save: the next save of its step, or a
prune, deletes it. A folder with one is a committed checkpoint, complete if every file it lists
is there at its size, else corrupt: evidence, never deleted nor overwritten, and set aside under
`step-NNNNNNN.corrupt-<UTC time>` (out of the names that resumes, prunes and saves use) once a
resume has passed it by.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
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
    Lazy: one listing, then one GET (its COMMIT) per folder taken, so finding the newest costs
    the same with 1 or 1,000 checkpoints kept."""
    for step, sizes in sorted(RunLayout(store).checkpoint_folders().items(), reverse=True):
        if (found := read_committed(store, step, RunLayout.checkpoint(step), sizes)) is not None:
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
    half-deleted checkpoint never looks complete; a local folder leaves no empty dirs."""
    commits = [RunLayout.commit_marker(prefix) for prefix in files]
    store.delete_many(commits)
    store.delete_many(key for keys in files.values() for key in keys if key not in commits)
    for prefix in files:
        if (folder := store.local_path(prefix)) is not None and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def prune_checkpoints(store: Store, keep: int | None) -> list[int]:
    """Keep the newest `keep` complete checkpoints; delete older ones and the leftovers of crashed
    saves (no COMMIT) older than the newest complete one. A corrupt checkpoint is never deleted.
    Returns the deleted steps. Costs one listing, a GET per COMMIT of the kept checkpoints and of
    those it deletes (none beyond the newest with `keep` null), and batched deletes."""
    folders = RunLayout(store).checkpoint_folders()
    newest_complete, complete, doomed = None, 0, {}
    for step, sizes in sorted(folders.items(), reverse=True):
        prefix = RunLayout.checkpoint(step)
        if RunLayout.commit_marker(prefix) not in sizes:  # a crashed save (or one newer, in flight)
            if newest_complete is not None:
                doomed[step] = prefix
            continue
        if keep is None and newest_complete is not None:
            continue  # everything committed is kept: no need to read it
        found = read_committed(store, step, prefix, sizes)
        if not isinstance(found, Checkpoint):  # corrupt: evidence; or deleted since the listing
            continue
        newest_complete = step if newest_complete is None else newest_complete
        complete += 1
        if keep is not None and complete > keep:
            doomed[step] = prefix
    delete_folders(store, {prefix: list(folders[step]) for step, prefix in doomed.items()})
    return sorted(doomed)


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
