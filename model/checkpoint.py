"""Training checkpoints on the object store: written so that a crash never leaves one that looks complete.

    <run>/checkpoints/step-0000040/
        model.safetensors    full (unsharded) fp32 weights, Hugging Face parameter names
        optimizer.pt         full AdamW state keyed by parameter name (plain tensors and numbers)
        rng.pt               every rank's python / numpy / torch (and CUDA) RNG states
        train_state.json     step, tokens seen, loader state, world size, model and run config
        COMMIT               written last: the step and every file's size and sha256

A checkpoint counts only if its COMMIT exists and every file it lists is there at its size;
a resume takes the newest whose files also match their sha256s, and tensors load with `torch.load(weights_only=True)` (a file
holding any pickled object other than tensors and plain containers is refused). State is
gathered to full tensors on rank 0 and broadcast back on load, so a run can resume on a
different number of ranks (DCP's sharded format would need pickle to read its metadata).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from model.config import LlamaConfig
from model.llama import Llama
from model.train_config import TrainConfig
from storage.manifest import ObjectInfo, Record, read_record, sha256_file, write_record
from storage.store import ObjectNotFound, Store, join_key, open_store

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMMIT = "COMMIT"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "train_state.json"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")
# Full state on rank 0 only, in CPU memory; on load, rank 0's full state is broadcast to all.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


class CheckpointError(Exception):
    """A checkpoint is unusable (corrupt, unsafe, or from an incompatible run); the message names it."""


class CorruptCheckpoint(CheckpointError):
    """A committed file's content no longer matches its sha256."""


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


@dataclass
class TrainState:
    """What besides weights and optimizer a resume needs, as stored in train_state.json."""

    step: int
    tokens_seen: int
    loader: dict[str, int]
    world_size: int
    model_config: dict[str, Any]
    config: dict[str, Any]


def checkpoint_prefix(step: int) -> str:
    return join_key(CHECKPOINTS, f"step-{step:07d}")


# --- the store layer: plain files, no torch.distributed -------------------------------------------


def commit_checkpoint(store: Store, step: int, files: dict[str, Path]) -> Checkpoint:
    """Upload `files` (name -> local path) into the step's folder, then its COMMIT marker last."""
    prefix = checkpoint_prefix(step)
    store.delete(join_key(prefix, COMMIT))  # an older commit of this step must not vouch for new files
    infos = []
    for name, path in sorted(files.items()):
        store.put_file(join_key(prefix, name), path)
        infos.append(ObjectInfo.of_file(name, path))
    marker = CommitMarker(step=step, files=infos)
    write_record(store, join_key(prefix, COMMIT), marker)
    return Checkpoint(step, prefix, tuple(infos))


def _step_folders(store: Store) -> dict[int, str]:
    """Step -> folder key of every checkpoint folder, complete or not."""
    folders = {}
    for key in store.list(CHECKPOINTS + "/"):
        folder = key.split("/")[1]
        if match := _STEP_FOLDER.match(folder):
            folders[int(match.group(1))] = join_key(CHECKPOINTS, folder)
    return folders


def _read_complete(store: Store, step: int, prefix: str) -> Checkpoint | None:
    """The checkpoint in `prefix` if its COMMIT exists and lists files present at their sizes."""
    try:
        marker = read_record(store, join_key(prefix, COMMIT), CommitMarker)
    except ObjectNotFound:
        return None
    except ValidationError as e:
        log.warning("ignoring checkpoint %s: unreadable COMMIT marker: %s", store.url(prefix), e)
        return None
    if marker.step != step:
        log.warning("ignoring checkpoint %s: its COMMIT names step %d", store.url(prefix), marker.step)
        return None
    for info in marker.files:
        key = join_key(prefix, info.key)
        try:
            size = store.size(key)
        except ObjectNotFound:
            size = None
        if size != info.size:
            log.warning("ignoring checkpoint %s: %s is missing or has the wrong size", store.url(prefix), info.key)
            return None
    return Checkpoint(step, prefix, tuple(marker.files))


def _newest_first(store: Store, folders: dict[int, str]) -> Iterator[Checkpoint]:
    """The complete checkpoints among `folders`, newest first, each checked only when reached."""
    for step in sorted(folders, reverse=True):
        if (checkpoint := _read_complete(store, step, folders[step])) is not None:
            yield checkpoint


def complete_checkpoints(store: Store) -> list[Checkpoint]:
    """Every complete checkpoint of a run store, newest first."""
    return list(_newest_first(store, _step_folders(store)))


def latest_checkpoint(store: Store) -> Checkpoint | None:
    return next(_newest_first(store, _step_folders(store)), None)


def prune_checkpoints(store: Store, keep: int | None) -> list[int]:
    """Keep the newest `keep` complete checkpoints; delete older ones (COMMIT first, so a half-deleted
    one never looks complete) and incomplete leftovers older than the newest complete one.
    Returns the deleted steps."""
    folders = _step_folders(store)
    complete = list(_newest_first(store, folders))
    if not complete:
        return []
    kept = {c.step for c in (complete if keep is None else complete[:keep])}
    newest = complete[0].step
    deleted = []
    for step, prefix in sorted(folders.items()):
        if step in kept or step > newest:
            continue
        store.delete(join_key(prefix, COMMIT))
        for key in store.list(prefix + "/"):
            store.delete(key)
        deleted.append(step)
    return deleted


def fetch_file(store: Store, checkpoint: Checkpoint, name: str, dest_dir: Path) -> Path:
    """Download one file of a checkpoint and check it against the COMMIT's sha256."""
    info = next((f for f in checkpoint.files if f.key == name), None)
    if info is None:
        raise CheckpointError(f"{store.url(checkpoint.prefix)}: its COMMIT lists no {name}")
    path = store.download(checkpoint.key(name), dest_dir / name)
    if sha256_file(path) != info.sha256:
        raise CorruptCheckpoint(f"{store.url(checkpoint.key(name))}: sha256 differs from its COMMIT marker")
    return path


def load_tensors(path: Path, source: str) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only, never pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{source}: refused to load: it holds pickled objects other than tensors and plain containers ({e})"
        ) from None


def read_train_state(path: Path, source: str) -> TrainState:
    try:
        return TrainState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: unreadable: {e}") from None


# --- RNG states --------------------------------------------------------------------------------------


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


# --- the distributed layer: every rank calls these together -----------------------------------------


def save_checkpoint(
    store: Store,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    keep: int | None,
    staging_dir: Path,
) -> None:
    """Gather the full state on rank 0, write it to the store as checkpoint `state.step`, commit, prune."""
    model_state = get_model_state_dict(model, options=_GATHER)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    rng_states = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rng_state(), rng_states, dst=0)
    if dist.get_rank() == 0:
        staging_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging_dir, prefix="save-") as tmp:
            files = {name: Path(tmp) / name for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)}
            save_file({k: v.contiguous() for k, v in model_state.items()}, files[MODEL_FILE])
            torch.save(optimizer_state, files[OPTIMIZER_FILE])
            torch.save({f"rank-{r}": s for r, s in enumerate(rng_states)}, files[RNG_FILE])
            files[STATE_FILE].write_text(json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
            checkpoint = commit_checkpoint(store, state.step, files)
        log.info("checkpoint %s committed", store.url(checkpoint.prefix))
        deleted = prune_checkpoints(store, keep)
        if deleted:
            log.info("deleted older checkpoints at steps %s", deleted)
    dist.barrier()


def _read_newest(store: Store, staging_dir: Path) -> tuple[Checkpoint, TrainState, dict, dict, dict] | None:
    """Rank 0: the newest complete checkpoint whose files match their sha256s, read into memory."""
    for checkpoint in complete_checkpoints(store):
        staging_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging_dir, prefix="load-") as tmp:
            folder = Path(tmp)
            try:
                paths = {name: fetch_file(store, checkpoint, name, folder)
                         for name in (STATE_FILE, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE)}
            except CorruptCheckpoint as e:
                log.warning("skipping a corrupt checkpoint: %s", e)
                continue
            state = read_train_state(paths[STATE_FILE], store.url(checkpoint.key(STATE_FILE)))
            model_state = load_file(paths[MODEL_FILE])
            optimizer_state = load_tensors(paths[OPTIMIZER_FILE], store.url(checkpoint.key(OPTIMIZER_FILE)))
            rng = load_tensors(paths[RNG_FILE], store.url(checkpoint.key(RNG_FILE)))
        return checkpoint, state, model_state, optimizer_state, rng
    return None


def restore_checkpoint(
    store: Store, model: nn.Module, optimizer: torch.optim.Optimizer, staging_dir: Path
) -> TrainState | None:
    """Load the newest intact checkpoint into model and optimizer on every rank; None if there is none.

    Rank 0 reads and verifies the files, then broadcasts; ranks that the saving run did not have
    (a larger world size now) keep their freshly seeded RNG states.
    """
    loaded: list[Any] = [None, None]  # TrainState, every saved rank's RNG states
    model_state: dict[str, torch.Tensor] = {}
    optimizer_state: dict[str, Any] = {}
    if dist.get_rank() == 0 and (newest := _read_newest(store, staging_dir)) is not None:
        checkpoint, state, model_state, optimizer_state, rng = newest
        loaded = [state, rng]
        log.info("resuming from %s (step %d)", store.url(checkpoint.prefix), state.step)
    dist.broadcast_object_list(loaded, src=0)
    state, rng = loaded
    if state is None:
        return None
    set_model_state_dict(model, model_state, options=_SCATTER)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_SCATTER)
    mine = rng.get(f"rank-{dist.get_rank()}")
    if mine is not None:
        set_rng_state(mine)
    return state


# --- export ------------------------------------------------------------------------------------------


def resolve_checkpoint(uri: str) -> tuple[Store, Checkpoint]:
    """A checkpoint folder URI, or a run folder URI meaning its newest complete checkpoint."""
    store = open_store(uri)
    if store.exists(COMMIT):  # a checkpoint folder: view it from its run folder
        run_uri, _, folder = uri.rstrip("/").rpartition(f"/{CHECKPOINTS}/")
        match = _STEP_FOLDER.match(folder)
        if not run_uri or not match:
            raise CheckpointError(f"{uri}: a checkpoint folder must be <run>/{CHECKPOINTS}/step-NNNNNNN")
        run_store, step = open_store(run_uri), int(match.group(1))
        checkpoint = _read_complete(run_store, step, checkpoint_prefix(step))
        if checkpoint is None:
            raise CheckpointError(f"{uri}: incomplete checkpoint (files missing or the wrong size)")
        return run_store, checkpoint
    checkpoint = latest_checkpoint(store)
    if checkpoint is None:
        raise CheckpointError(f"{uri}: neither a checkpoint folder (no {COMMIT}) nor a run with a complete checkpoint")
    return store, checkpoint


def load_model(checkpoint_uri: str) -> tuple[Llama, TrainConfig]:
    """The trained model (fp32, CPU) and run config of a checkpoint folder or a run's newest checkpoint."""
    store, checkpoint = resolve_checkpoint(checkpoint_uri)
    with tempfile.TemporaryDirectory(prefix="tinyllama-load-") as tmp:
        state = read_train_state(fetch_file(store, checkpoint, STATE_FILE, Path(tmp)), store.url(checkpoint.key(STATE_FILE)))
        weights = load_file(fetch_file(store, checkpoint, MODEL_FILE, Path(tmp)))
    with torch.device("meta"):
        model = Llama(LlamaConfig.model_validate(state.model_config))
    try:
        model.load_state_dict(weights, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{store.url(checkpoint.key(MODEL_FILE))}: does not fit its model config: {e}") from None
    model.reset_rope_cache()
    return model, TrainConfig.model_validate(state.config)
