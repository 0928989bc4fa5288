"""Training checkpoints on the object store: sharded, written by every rank, resharded on load,
and never trusted before their COMMIT marker.

    <run>/checkpoints/step-0000040/
        __0_0.distcp, __1_0.distcp ...  torch.distributed.checkpoint (DCP) shards: each rank's model
                                        shards and values
        __0_optimizer_0.distcp ...      and, in files of their own, each rank's optimizer shards
        .metadata                       DCP's index of every tensor chunk and value (coordinator)
        COMMIT                          written last: the step and every file's size and sha256

One `Checkpointer` is handed the training's Stateful components (model, optimizer, scheduler,
loader, progress counters, RNG, architecture) and gathers their own `state_dict()`s at save
time, as torchtitan does; DCP writes each rank's shards (FSDP2's DTensor shards, or an even
split of DDP's replicated tensors) to a local folder: the store's own folder, or a staging
folder whose files each rank then uploads itself. `async_save` stages a CPU copy and lets the
loop go on while the files are written, uploaded and committed (at most one in flight).

A folder without a COMMIT is the leftover of a crashed save: the next save of its step, or a
prune, deletes it. A folder with one is a committed checkpoint, complete if every file it lists
is there at its size. A resume takes the newest whose files also match their sha256s (each rank
hashes a share of the files) and loads it through DCP, which reshards to the current world
size. A committed checkpoint that does not verify is corrupt: it is reported (the file, and the
sha256 its COMMIT lists against the one read) and never deleted nor overwritten. When an older
one verifies, or when the run starts over (`start_over`) because none does, the corrupt ones
are set aside under `step-NNNNNNN.corrupt-<UTC time>` (out of the names that resumes, prunes
and saves use, the files unchanged); when none verifies and the run does not start over, the
resume refuses and changes nothing. Loading is `weights_only` throughout: tensors and values
with `torch.load(weights_only=True)`, DCP's metadata through an unpickler that admits only
DCP's own metadata classes, once its sha256 matches the COMMIT's.

Reading (StoreReader) fetches the files a load needs with a bounded pool of threads. A resume
merges the ranges it wants of each file into few GETs; reading the model alone (`load_model`:
export-hf, evaluate) reads only the files that hold its tensors, each whole in one streaming GET,
and checks their sha256s as they pass: never an optimizer byte (checkpoints written before the
optimizer had files of its own: its bytes pass through the hash, never into memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pydantic import ValidationError
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed._shard._utils import narrow_tensor_by_index  # DCP's own reader narrows with it
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.futures import Future as TorchFuture

from model.config import LlamaConfig
from model.llama import Llama
from model.train_config import TrainConfig
from storage.manifest import ObjectInfo, Record, read_record, sha256_bytes, sha256_stream, write_record
from storage.run_layout import COMMIT, RunLayout
from storage.store import ObjectNotFound, Store, join_key, open_store

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
LEGACY_MODEL_FILE = "model.safetensors"  # the full-state format of earlier versions
OPTIMIZER_KEY = "optimizer"  # its entries go to files of their own (_ModelApartWriter)
# Reading a checkpoint: files fetched at once, and how ranges of one file are merged into one GET
# (resumes; a verified read fetches whole files).
READ_THREADS = 8
COALESCE_GAP = 1 << 20
COALESCE_SPAN = 64 << 20
HASH_PIECE = 8 << 20
# Collectives (a checkpoint's barrier and gathers among them) fail after this long; a save must
# finish within it, and one taking over half of it is logged as a warning.
DIST_TIMEOUT = timedelta(minutes=30)


# Test-only hook (tests/model/test_kills.py SIGKILLs training at known points of a save): with
# TINYLLAMA_TEST_HOLD_SAVE="STEP:POINT:FOLDER", each rank's save of STEP creates FOLDER/POINT-rankR
# and blocks there for good, POINT being "start" (nothing of the save written yet) or "commit"
# (this rank's files on the store, COMMIT not yet written). Unset, it does nothing.
HOLD_SAVE_ENV = "TINYLLAMA_TEST_HOLD_SAVE"


def _hold_for_test(step: int, point: str, rank: int) -> None:
    if not (spec := os.environ.get(HOLD_SAVE_ENV)):
        return
    hold_step, hold_point, folder = spec.split(":", 2)
    if int(hold_step) == step and hold_point == point:
        Path(folder, f"{point}-rank{rank}").touch()
        threading.Event().wait()


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


# --- the store layer: commit markers, listing, pruning (no torch.distributed) ---------------------


def commit_checkpoint(store: Store, step: int, files: list[ObjectInfo]) -> Checkpoint:
    """Write the COMMIT marker of the step's folder, whose `files` (relative keys) are already there."""
    prefix = RunLayout.checkpoint(step)
    infos = sorted(files, key=lambda f: f.key)
    write_record(store, RunLayout.commit_marker(prefix), CommitMarker(step=step, files=infos))
    return Checkpoint(step, prefix, tuple(infos))


def _read_committed(store: Store, step: int, prefix: str, sizes: dict[str, int]) -> Checkpoint | CorruptCheckpoint | None:
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


def _sizes(store: Store, prefix: str) -> dict[str, int]:
    return {listed.key: listed.size for listed in store.list_info(prefix + "/")}


def committed_checkpoints(store: Store) -> Iterator[Checkpoint | CorruptCheckpoint]:
    """The committed checkpoints of a run store, newest first: complete, or corrupt by the listing.
    Lazy: one listing, then one GET (its COMMIT) per folder taken, so finding the newest costs
    the same with 1 or 1,000 checkpoints kept."""
    for step, sizes in sorted(RunLayout(store).checkpoint_folders().items(), reverse=True):
        if (found := _read_committed(store, step, RunLayout.checkpoint(step), sizes)) is not None:
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


def _delete_folders(store: Store, files: dict[str, list[str]]) -> None:
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
        found = _read_committed(store, step, prefix, sizes)
        if not isinstance(found, Checkpoint):  # corrupt: evidence; or deleted since the listing
            continue
        newest_complete = step if newest_complete is None else newest_complete
        complete += 1
        if keep is not None and complete > keep:
            doomed[step] = prefix
    _delete_folders(store, {prefix: list(folders[step]) for step, prefix in doomed.items()})
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
    _delete_folders(store, {corrupt.prefix: keys})
    return store.url(target)


# --- weights_only reading of DCP files ----------------------------------------------------------------


_DCP_METADATA = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: admit exactly the (module, name) pairs DCP's metadata is made
    of. Nothing is looked up by a dotted name (protocol 4's STACK_GLOBAL resolves
    "os.system" inside an allowed module) nor allowed module-wide (a module's namespace holds
    whatever it imported)."""

    ALLOWED = frozenset(
        {(_DCP_METADATA, name) for name in (
            "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
            "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
        )}
        | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
           ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
        | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def read_metadata(store: Store, checkpoint: Checkpoint) -> Metadata:
    """DCP's index of the checkpoint's files, checked against its COMMIT's sha256, unpickled by
    _MetadataUnpickler."""
    key = checkpoint.key(METADATA_FILE)
    data = store.get_bytes(key)
    listed = next((info.sha256 for info in checkpoint.files if info.key == METADATA_FILE), "no such file")
    if (actual := sha256_bytes(data)) != listed:
        raise CheckpointError(f"corrupt checkpoint {store.url(checkpoint.prefix)}: {store.url(key)}: "
                              f"sha256 {actual}, its COMMIT lists {listed}")
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # whatever a crafted pickle makes the allowed classes raise
        raise CheckpointError(f"{store.url(key)}: refused to load: {e}") from None


# The reason torch gives after its advice to retry with weights_only=False (advice never passed on:
# that would run whatever code the file holds).
_WEIGHTS_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.*?)(?:\s+Please use|\n\n|$)", re.S)


def weights_only_refusal(error: pickle.UnpicklingError) -> str:
    """What torch.load(weights_only=True) refused in a file, in one line, without torch's advice."""
    match = _WEIGHTS_UNPICKLER_REASON.search(str(error))
    return " ".join(match[1].split()) if match and match[1].strip() else "not a pickle of tensors and plain containers"


def load_value(data: bytes, source: str) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never pickled code."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{source}: refused to load: it holds pickled objects other than tensors and plain containers "
            f"({weights_only_refusal(e)})"
        ) from None


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor values load with weights_only=True; `source`
    (the checkpoint folder) names them in errors."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = load_value(value.getvalue(), f"{self.source} value {read_item.dest_index.fqn}")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # DCP's own helper for this

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _ModelApartWriter(FileSystemWriter):
    """DCP's file-system writer, each rank's optimizer state in a file of its own: `__R_0.distcp`
    holds the rank's model shards and small values, `__R_optimizer_0.distcp` its optimizer shards,
    so reading the model (an export, an evaluation) fetches and verifies none of the optimizer's."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> TorchFuture:
        prefix = plan.storage_data.prefix  # "__R_": DCP's own naming of this rank's files
        optimizer = [item for item in plan.items if item.index.fqn.startswith(OPTIMIZER_KEY + ".")]
        rest = [item for item in plan.items if not item.index.fqn.startswith(OPTIMIZER_KEY + ".")]
        results = []
        for items, file_prefix in ((rest, prefix), (optimizer, f"{prefix}{OPTIMIZER_KEY}_")):
            if items:
                part = dataclasses.replace(plan, items=items,
                                           storage_data=dataclasses.replace(plan.storage_data, prefix=file_prefix))
                results += super().write_data(part, planner).wait()
        written: TorchFuture = TorchFuture()
        written.set_result(results)
        return written


@dataclass(frozen=True)
class _StoredItem:
    """One chunk or value of a DCP file and the read requests that want it (several when resharding
    reads parts of one stored chunk into several local ones)."""

    offset: int
    length: int
    requests: tuple[ReadItem, ...]

    @property
    def end(self) -> int:
        return self.offset + self.length


class StoreReader(FileSystemReader):
    """DCP's file-system reader over a checkpoint folder on any store, weights_only throughout.

    The files DCP asks from are fetched by a bounded pool of threads. With `verify`, each is read
    whole as one streaming GET, hashed as it passes and checked against its COMMIT's sha256 (the
    files no requested tensor lies in, e.g. the optimizer's for an export, are neither read nor
    hashed); without, the requested ranges of a file are coalesced into few ranged GETs (ranges at
    most COALESCE_GAP apart, spans of at most COALESCE_SPAN). Each chunk's bytes are handed to DCP as
    soon as they arrive: memory beyond the state loaded into is, per thread, one span or one chunk
    (twice: its bytes and the tensor torch.load makes of them)."""

    def __init__(self, store: Store, checkpoint: Checkpoint, metadata: Metadata | None = None, verify: bool = False):
        super().__init__(checkpoint.prefix)
        self.store, self.checkpoint, self.verify = store, checkpoint, verify
        self._metadata = metadata
        self._listed = {info.key: info for info in checkpoint.files}
        self._bytes_lock = threading.Lock()  # DCP's load_bytes builds nested containers: one at a time

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata or read_metadata(self.store, self.checkpoint)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> TorchFuture:
        by_file: dict[str, dict[Any, list[ReadItem]]] = {}
        for request in plan.items:
            name = self.storage_data[request.storage_index].relative_path
            by_file.setdefault(name, {}).setdefault(request.storage_index, []).append(request)
        jobs = []
        for name, by_chunk in by_file.items():
            items = sorted((_StoredItem(self.storage_data[index].offset, self.storage_data[index].length, tuple(requests))
                            for index, requests in by_chunk.items()), key=lambda item: item.offset)
            if self.verify:
                jobs.append(functools.partial(self._read_verified, name, items, planner))
            else:
                jobs += [functools.partial(self._read_span, name, span, planner) for span in _coalesce(items)]
        with ThreadPoolExecutor(max(1, min(READ_THREADS, len(jobs))), thread_name_prefix="checkpoint-read") as pool:
            futures = [pool.submit(job) for job in jobs]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        done: TorchFuture = TorchFuture()
        done.set_result(None)
        return done

    def _read_span(self, name: str, span: list[_StoredItem], planner: LoadPlanner) -> None:
        start = span[0].offset
        data = memoryview(self.store.get_range(self.checkpoint.key(name), start, max(i.end for i in span) - start))
        for item in span:
            self._deliver(item, data[item.offset - start : item.end - start], planner)

    def _read_verified(self, name: str, items: list[_StoredItem], planner: LoadPlanner) -> None:
        """The file read whole, its chunks handed over as they pass, then its sha256 checked; a chunk
        that fails to load in a file that does not verify is reported as the corruption it is."""
        key = self.checkpoint.key(name)
        if (listed := self._listed.get(name)) is None:
            raise CheckpointError(f"{self.store.url(key)}: named by the checkpoint's metadata, not listed in its COMMIT")
        digest, position, failure = hashlib.sha256(), 0, None
        with self.store.open_read(key) as stream:
            for item in items:
                if item.offset < position:  # DCP writes each chunk once; a stream cannot go back
                    raise CheckpointError(f"{self.store.url(key)}: overlapping entries in the checkpoint's metadata")
                _hash_through(stream, digest, item.offset - position)
                data = stream.read(item.length)
                digest.update(data)
                position = item.end
                if failure is not None:
                    continue
                if len(data) < item.length:
                    failure = CheckpointError(f"{self.store.url(key)}: ends within {item.requests[0].storage_index.fqn}")
                    continue
                try:
                    self._deliver(item, data, planner)
                except Exception as error:  # noqa: BLE001 - reported below, once the file's sha256 is known
                    failure = error
            _hash_through(stream, digest, None)
        if (actual := digest.hexdigest()) != listed.sha256:
            raise CheckpointError(f"corrupt checkpoint {self.store.url(self.checkpoint.prefix)}: "
                                  f"{self.store.url(key)}: sha256 {actual}, its COMMIT lists {listed.sha256}")
        if failure is not None:
            raise failure

    def _deliver(self, item: _StoredItem, data: bytes | memoryview, planner: LoadPlanner) -> None:
        """Hand a stored chunk's bytes to each request of it, as FileSystemReader.read_data does."""
        first = item.requests[0]
        stream = io.BytesIO(data)  # no copy of bytes
        if descriptors := self.storage_data[first.storage_index].transform_descriptors:  # DCP's extensions
            stream = io.BytesIO(self.transforms.transform_load_stream(first, descriptors, stream).read())
        if first.type == LoadItemType.BYTE_IO:
            with self._bytes_lock:
                for request in item.requests:
                    stream.seek(0)
                    planner.load_bytes(request, stream)
            return
        stored = torch.load(stream, map_location="cpu", weights_only=True)
        for request in item.requests:
            piece = narrow_tensor_by_index(stored, request.storage_offsets, request.lengths)
            target = planner.resolve_tensor(request).detach()
            if target.size() != piece.size():
                raise CheckpointError(f"{self.store.url(self.checkpoint.prefix)}: {request.dest_index.fqn} is "
                                      f"{tuple(piece.size())} in the checkpoint, {tuple(target.size())} in the model")
            target.copy_(piece)
            planner.commit_tensor(request, target)


def _coalesce(items: list[_StoredItem]) -> list[list[_StoredItem]]:
    """Items (sorted by offset) grouped into spans that one ranged GET each reads."""
    spans: list[list[_StoredItem]] = []
    for item in items:
        if spans and item.offset - spans[-1][-1].end <= COALESCE_GAP and item.end - spans[-1][0].offset <= COALESCE_SPAN:
            spans[-1].append(item)
        else:
            spans.append([item])
    return spans


def _hash_through(stream: BinaryIO, digest: Any, length: int | None) -> None:
    """Read `length` bytes (None: to the end) of `stream` into `digest` only, a piece at a time."""
    while length is None or length > 0:
        piece = stream.read(HASH_PIECE if length is None else min(HASH_PIECE, length))
        if not piece:
            return
        digest.update(piece)
        if length is not None:
            length -= len(piece)


def _load_safely(
    states: dict[str, Any], store: Store, checkpoint: Checkpoint, *, metadata: Metadata | None = None,
    verify: bool = False, **options: Any,
) -> None:
    """dcp.load through StoreReader and _SafeLoadPlanner; a refused value raises its own CheckpointError
    (DCP wraps every rank's errors in a CheckpointException, a BaseException with their tracebacks)."""
    try:
        dcp.load(states, storage_reader=StoreReader(store, checkpoint, metadata, verify),
                 planner=_SafeLoadPlanner(store.url(checkpoint.prefix)), **options)
    except CheckpointException as e:
        refused = [error for error, _ in e.failures.values() if isinstance(error, CheckpointError)]
        if refused:
            raise refused[0] from None
        raise


def sha256_mismatches(store: Store, checkpoint: Checkpoint, files: Sequence[ObjectInfo]) -> list[str]:
    """For each of `files` (of the checkpoint) whose sha256 is not its COMMIT's: the file and both sha256s."""
    mismatches = []
    for info in files:
        with store.open_read(checkpoint.key(info.key)) as stream:
            actual = sha256_stream(stream)
        if actual != info.sha256:
            mismatches.append(f"{store.url(checkpoint.key(info.key))}: sha256 {actual}, its COMMIT lists {info.sha256}")
    return mismatches


def read_values(store: Store, checkpoint: Checkpoint, prefix: str, metadata: Metadata | None = None) -> dict[str, Any]:
    """The plain values (not tensors) saved under `prefix` ("progress", "loader", ...), by flat key."""
    metadata = metadata or read_metadata(store, checkpoint)
    values = {}
    for index, info in metadata.storage_data.items():
        fqn = index.fqn
        if fqn.startswith(prefix + ".") and isinstance(metadata.state_dict_metadata[fqn], BytesStorageMetadata):
            data = store.get_range(checkpoint.key(info.relative_path), info.offset, info.length)
            values[fqn.removeprefix(prefix + ".")] = load_value(data, f"{store.url(checkpoint.prefix)} value {fqn}")
    return values


# --- the Stateful components that are not a torch object's own ---------------------------------------


class ModelState(Stateful):
    """The model's parameters by their unwrapped names (DTensor shards under FSDP2)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState(Stateful):
    """The optimizer's state keyed by parameter name (so it reshards like the parameters)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class Architecture(Stateful):
    """The model config a checkpoint's tensors belong to: saved with them, and a resume refuses another."""

    def __init__(self, config: LlamaConfig):
        self.config_json = config.model_dump_json()

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config_json}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != self.config_json:
            raise CheckpointError(f"the checkpoint's model {state['config']} differs from the config's {self.config_json}")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": np_pos,
                  "has_gauss": np_has_gauss, "cached_gaussian": np_gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGState(Stateful):
    """This rank's RNG states, under a key of its own (`rank-R`): ranks the saving run did not have
    (a larger world size now) keep their freshly seeded states."""

    def __init__(self, rank: int):
        self.key = f"rank-{rank}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key: rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state[self.key])


# --- the checkpointer: every rank calls save/load together -------------------------------------------

RNG_KEY = "rng"


class Checkpointer:
    """Saves and restores the Stateful components in `states` as sharded checkpoints of a run."""

    def __init__(
        self,
        layout: RunLayout,
        states: dict[str, Stateful],
        *,
        keep: int | None,
        staging_dir: Path,
        async_save: bool = False,
    ):
        self.layout, self.store, self.states = layout, layout.store, states
        self.keep, self.async_save = keep, async_save
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Checkpoint collectives on a gloo group of their own: the async writer's run in a
        # background thread, beside the training's collectives (NCCL on GPUs).
        self.group = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT)
        local = self.store.local_path(RunLayout.checkpoint(0)) is not None
        self.staging_dir = None if local else staging_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if async_save else None
        self._in_flight: Future | None = None
        self.last_save_s: float | None = None  # call to commit, of the newest finished save

    # -- save --

    def save(self, step: int, replace: bool = False) -> None:
        """Checkpoint the components at `step`: return once committed, or, with async_save, once a
        CPU copy is staged (a previous save still in flight is finished first). A committed
        checkpoint already in the step's folder is refused unless `replace` (the converter rewrites
        one in place): a resume sets corrupt ones aside, so training never meets one."""
        _hold_for_test(step, "start", self.rank)
        self.wait()
        started = time.perf_counter()
        if self.rank == 0:  # leftovers of a crashed save of this step must not mix with the new files
            self._delete_leftovers(step, replace)
        folder = self._write_folder(step)
        if self.staging_dir is not None:  # this rank's files of a crashed save: not to be uploaded
            for stale in folder.glob(f"__{self.rank}_*"):
                stale.unlink()
        dist.barrier(group=self.group)
        writer = _ModelApartWriter(folder, sync_files=self.staging_dir is None)
        if self._executor is None:
            dcp.save(self.states, storage_writer=writer, process_group=self.group)
            self._finish(step, folder, started)
        else:
            written = dcp.async_save(self.states, storage_writer=writer, process_group=self.group)
            self._in_flight = self._executor.submit(self._finish_after, written, step, folder, started)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()

    def _delete_leftovers(self, step: int, replace: bool) -> None:
        prefix = RunLayout.checkpoint(step)
        leftovers = list(self.store.list(prefix + "/"))  # usually none: one listing request
        if not replace and RunLayout.commit_marker(prefix) in leftovers:
            raise CheckpointError(
                f"{self.store.url(prefix)} holds a committed checkpoint this run did not resume from "
                "(written by another job?): refusing to overwrite it"
            )
        if leftovers:
            _delete_folders(self.store, {prefix: leftovers})

    def _write_folder(self, step: int) -> Path:
        if self.staging_dir is None:
            return self.store.local_path(RunLayout.checkpoint(step))
        return self.staging_dir / f"step-{step:07d}"

    def _finish_after(self, written: Future, step: int, folder: Path, started: float) -> None:
        written.result()
        self._finish(step, folder, started)

    def _finish(self, step: int, folder: Path, started: float) -> None:
        """Each rank uploads (or just hashes) its own files; rank 0 commits what all ranks report."""
        mine = [p for p in sorted(folder.iterdir()) if p.name.startswith(f"__{self.rank}_")
                or (self.rank == 0 and p.name == METADATA_FILE)]
        prefix = RunLayout.checkpoint(step)
        infos = []
        for path in mine:
            if self.staging_dir is not None:
                self.store.put_file(join_key(prefix, path.name), path)
            infos.append(ObjectInfo.of_file(path.name, path))
            if self.staging_dir is not None:
                path.unlink()
        _hold_for_test(step, "commit", self.rank)
        reports: list[Any] = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(infos, reports, dst=0, group=self.group)
        if self.rank != 0:
            if self.staging_dir is not None:  # empty now, unless another rank of this node is the coordinator
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self.last_save_s = time.perf_counter() - started
            return
        checkpoint = commit_checkpoint(self.store, step, [info for report in reports for info in report])
        seconds = self.last_save_s = time.perf_counter() - started
        log.info("checkpoint %s committed (%.1f s)", self.store.url(checkpoint.prefix), seconds)
        if seconds > DIST_TIMEOUT.total_seconds() / 2:
            log.warning("checkpoint %s took %.0f s, over half the distributed timeout %s",
                        self.store.url(checkpoint.prefix), seconds, DIST_TIMEOUT)
        if self.staging_dir is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if deleted := prune_checkpoints(self.store, self.keep):
            log.info("deleted older checkpoints at steps %s", deleted)

    # -- load --

    def load(self, start_over: bool = False) -> int | None:
        """Load the newest checkpoint that verifies into the components and return its step; the
        corrupt ones newer than it are reported and set aside. If checkpoints exist but none
        verifies: with `start_over`, set them aside and return None (the run starts from step 0);
        without, raise a CheckpointError naming them, and change nothing. None if there are none."""
        candidates = committed_checkpoints(self.store) if self.rank == 0 else None
        corrupt: list[CorruptCheckpoint] = []
        while (checkpoint := self._next_candidate(candidates)) is not None:
            if isinstance(checkpoint, Checkpoint):
                if checkpoint.is_legacy:
                    raise CheckpointError(
                        f"{self.store.url(checkpoint.prefix)} is in the full-state format of earlier versions "
                        f"({LEGACY_MODEL_FILE}); convert it to the sharded format with "
                        f"`python -m model.convert_checkpoint {self.store.url(checkpoint.prefix)}`"
                    )
                checkpoint = self._verify_everywhere(checkpoint)
            if isinstance(checkpoint, CorruptCheckpoint):
                if self.rank == 0:
                    log.warning("checkpoint %s is corrupt: %s", self.store.url(checkpoint.prefix), checkpoint.problem)
                corrupt.append(checkpoint)
                continue
            self._set_aside(corrupt)
            self._load_from(checkpoint)
            return checkpoint.step
        if corrupt and not start_over:
            raise CheckpointError(
                f"run {self.store.uri} cannot resume, no checkpoint verifies: "
                + "; ".join(c.problem for c in corrupt)
                + ". Nothing was changed; to train from step 0 instead (keeping these aside), start over "
                "(`tinyllama train --start-over`, or start_over: true)"
            )
        if corrupt and self.rank == 0:
            log.warning("starting over from step 0 (start_over): no checkpoint of run %s verifies", self.store.uri)
        self._set_aside(corrupt)
        return None

    def _next_candidate(self, candidates: Iterator[Checkpoint | CorruptCheckpoint] | None) -> Any:
        """Rank 0's next committed checkpoint (newest first), on every rank; None when there is none."""
        chosen: list[Any] = [next(candidates, None) if self.rank == 0 else None]
        dist.broadcast_object_list(chosen, src=0, group=self.group)
        return chosen[0]

    def _load_from(self, checkpoint: Checkpoint) -> None:
        states = dict(self.states)
        rng = states.get(RNG_KEY)
        if isinstance(rng, RNGState) and f"{RNG_KEY}.{rng.key}.torch" not in read_metadata(
            self.store, checkpoint
        ).state_dict_metadata:
            del states[RNG_KEY]
        _load_safely(states, self.store, checkpoint, process_group=self.group)
        if self.rank == 0:
            log.info("resumed from %s (step %d)", self.store.url(checkpoint.prefix), checkpoint.step)

    def _verify_everywhere(self, checkpoint: Checkpoint) -> Checkpoint | CorruptCheckpoint:
        """Every file's sha256 checked, the files shared out among the ranks."""
        mine = sha256_mismatches(self.store, checkpoint, checkpoint.files[self.rank :: self.world_size])
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        mismatches = sorted(m for ranks_share in everyone for m in ranks_share)
        if not mismatches:
            return checkpoint
        more = f" (and {len(mismatches) - 1} more files)" if len(mismatches) > 1 else ""
        return CorruptCheckpoint(checkpoint.step, checkpoint.prefix, mismatches[0] + more)

    def _set_aside(self, corrupt: list[CorruptCheckpoint]) -> None:
        if self.rank != 0:
            return
        for checkpoint in corrupt:
            moved_to = set_aside(self.store, checkpoint, self.staging_dir)
            log.warning("corrupt checkpoint %s set aside, unchanged, as %s", self.store.url(checkpoint.prefix), moved_to)


# --- export ------------------------------------------------------------------------------------------


def resolve_checkpoint(uri: str) -> tuple[RunLayout, Checkpoint]:
    """A checkpoint folder URI, or a run folder URI meaning its newest complete checkpoint."""
    store = open_store(uri)
    if store.exists(COMMIT):  # a checkpoint folder: view it from its run folder
        split = RunLayout.split_checkpoint_uri(uri)
        if split is None:
            raise CheckpointError(f"{uri}: a checkpoint folder must be <run>/checkpoints/step-NNNNNNN")
        layout, step = RunLayout.at(split[0]), split[1]
        prefix = RunLayout.checkpoint(step)
        checkpoint = _read_committed(layout.store, step, prefix, _sizes(layout.store, prefix))
        if isinstance(checkpoint, CorruptCheckpoint):
            raise CheckpointError(f"{uri}: corrupt checkpoint: {checkpoint.problem}")
        return layout, checkpoint
    checkpoint = latest_checkpoint(store)
    if checkpoint is None:
        raise CheckpointError(f"{uri}: neither a checkpoint folder (no {COMMIT}) nor a run with a complete checkpoint")
    return RunLayout(store), checkpoint


def load_model(checkpoint_uri: str) -> tuple[Llama, TrainConfig]:
    """The trained model (fp32, CPU) and run config of a checkpoint folder or a run's newest
    checkpoint: the shards consolidated in this one process, whatever world size wrote them.
    Reads and verifies (sha256) only the files that hold the model's tensors, never the optimizer's;
    the model is allocated on the meta device and filled from them, never initialized first."""
    layout, checkpoint = resolve_checkpoint(checkpoint_uri)
    store = layout.store
    if checkpoint.is_legacy:
        raise CheckpointError(
            f"{store.url(checkpoint.prefix)} is in the full-state format of earlier versions; convert it with "
            f"`python -m model.convert_checkpoint {store.url(checkpoint.prefix)}`"
        )
    metadata = read_metadata(store, checkpoint)
    architecture = read_values(store, checkpoint, "architecture", metadata)["config"]
    with torch.device("meta"):
        model = Llama(LlamaConfig.model_validate_json(architecture))
    model.to_empty(device="cpu")
    # The architecture again, from within the files read: the value the model was built from is verified with them.
    state = {"model": model.state_dict(), "architecture": {"config": ""}}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            _load_safely(state, store, checkpoint, metadata=metadata, verify=True, no_dist=True)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{store.url(checkpoint.prefix)}: does not fit its model config: {e}") from None
    if state["architecture"]["config"] != architecture:
        raise CheckpointError(f"{store.url(checkpoint.prefix)}: its architecture value changed while it was read")
    model.reset_rope_cache()
    return model, TrainConfig.model_validate_json(layout.read_config())
