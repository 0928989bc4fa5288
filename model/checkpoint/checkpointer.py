"""The checkpointer: every rank calls save and load together.

One `Checkpointer` is handed the training's Stateful components (model, optimizer, scheduler,
loader, progress counters, RNG, architecture) and gathers their own `state_dict()`s at save
time, as torchtitan does; DCP writes each rank's shards (FSDP2's DTensor shards, or an even
split of DDP's replicated tensors) to a local folder: the store's own folder, or a staging
folder whose files each rank then uploads itself. `async_save` stages a CPU copy and lets the
loop go on while the files are written, uploaded and committed (at most one in flight).

A resume takes the newest committed checkpoint whose files also match their sha256s (each rank
hashes a share of the files) and loads it through DCP, which reshards to the current world size.
A committed checkpoint that does not verify is corrupt: it is reported (the file, and the sha256
its COMMIT lists against the one read). When an older one verifies, or when the run starts over
(`start_over`) because none does, the corrupt ones are set aside; when none verifies and the run
does not start over, the resume refuses and changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.stateful import Stateful
from torch.futures import Future as TorchFuture

from model.checkpoint.layout import (
    LEGACY_MODEL_FILE, METADATA_FILE, OPTIMIZER_KEY, Checkpoint, CheckpointError, CorruptCheckpoint, commit_checkpoint,
    committed_checkpoints, delete_folders, prune_checkpoints, set_aside,
)
from model.checkpoint.safe_load import load_safely, read_metadata, sha256_mismatches
from model.checkpoint.states import RNG_KEY, RNGState
from storage.manifest import ObjectInfo
from storage.run_layout import RunLayout
from storage.store import join_key

log = logging.getLogger(__name__)

# Collectives (a checkpoint's barrier and gathers among them) fail after this long; a save must
# finish within it, and one taking over half of it is logged as a warning.
DIST_TIMEOUT = timedelta(minutes=30)


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
            delete_folders(self.store, {prefix: leftovers})

    def _write_folder(self, step: int) -> Path:
        if self.staging_dir is None:
            return self.store.local_path(RunLayout.checkpoint(step))
        return self.staging_dir / f"step-{step:07d}"

    def _finish_after(self, written: Future, step: int, folder: Path, started: float) -> None:
        written.result()
        self._finish(step, folder, started)

    def _finish(self, step: int, folder: Path, started: float) -> None:
        self._commit(step, folder, self._upload(step, folder), started)

    def _upload(self, step: int, folder: Path) -> list[ObjectInfo]:
        """This rank's files of the step on the store (uploaded from staging, or already in the
        store's own folder), with their sizes and sha256s."""
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
        return infos

    def _commit(self, step: int, folder: Path, infos: list[ObjectInfo], started: float) -> None:
        """Rank 0 commits what every rank reports having written, then prunes."""
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
        if deleted := prune_checkpoints(self.store, self.keep, newest=step):
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
        load_safely(states, self.store, checkpoint, process_group=self.group)
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
