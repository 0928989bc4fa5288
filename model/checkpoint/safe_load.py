"""Reading checkpoints safely: `weights_only` throughout, nothing pickled but DCP's own metadata.

Tensors and values load with `torch.load(weights_only=True)`; DCP's .metadata, once its sha256
matches the COMMIT's, through an unpickler that admits only DCP's own metadata classes.

Reading (StoreReader) fetches the files a load needs with a bounded pool of threads. A resume
merges the ranges it wants of each file into few GETs; reading the model alone (`load_model`:
export-hf, evaluate) reads only the files that hold its tensors, each whole in one streaming GET,
and checks their sha256s as they pass: never an optimizer byte (checkpoints written before the
optimizer had files of its own: its bytes pass through the hash, never into memory).
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import re
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index  # DCP's own reader narrows with it
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future as TorchFuture

from model.checkpoint.layout import Checkpoint, CheckpointError, METADATA_FILE, resolve_checkpoint
from model.config import LlamaConfig
from model.llama import Llama
from model.train_config import TrainConfig
from storage.manifest import ObjectInfo, sha256_bytes, sha256_stream
from storage.store import Store

# Reading a checkpoint: files fetched at once, and how ranges of one file are merged into one GET
# (resumes; a verified read fetches whole files).
READ_THREADS = 8
COALESCE_GAP = 1 << 20
COALESCE_SPAN = 64 << 20
HASH_PIECE = 8 << 20


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


def load_safely(
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
            load_safely(state, store, checkpoint, metadata=metadata, verify=True, no_dist=True)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{store.url(checkpoint.prefix)}: does not fit its model config: {e}") from None
    if state["architecture"]["config"] != architecture:
        raise CheckpointError(f"{store.url(checkpoint.prefix)}: its architecture value changed while it was read")
    model.reset_rope_cache()
    return model, TrainConfig.model_validate_json(layout.read_config())
