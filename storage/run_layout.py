"""The layout of a training run's folder: the one owner of every key in it.

    <output>/runs/<name>/
        config.json                 the run config: written once per launch by the launcher,
                                    read from here by every training process
        lease.json                  who trains the run now (storage/lease.py)
        metrics/FFFFFFFFFF-LLLLLLLLLL.jsonl  one JSON object per optimizer step, steps F..L: a segment
                                    appended at each checkpoint, never rewritten (model/metrics.py)
        metrics.jsonl               the whole run's records in one file (runs from before segments)
        progress.json               rank 0's latest step and recent logged ones, put every ~10 s:
                                    what the Prefect task reports
        tensorboard/events.out.tfevents.step-FFFFFFFFFF-LLLLLLLLLL  TensorBoard's events of steps F..L
        plots/loss.png              the loss curve
        checkpoints/step-NNNNNNN/   one checkpoint (model/checkpoint/), its COMMIT marker last
        checkpoints/step-NNNNNNN.corrupt-<UTC time>/  a corrupt checkpoint set aside, files unchanged
        hf/                         `export-hf`'s default output
        eval/step-NNNNNNN.json      lm-eval's results for a checkpoint (tasks/evaluate.py)
        eval.jsonl                  one line per evaluation
        plots/eval.png              each evaluation metric against tokens seen

Plain keys and a store, no torch: the CLI, flows and tasks read a run without paying for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from storage.store import Store, join_key, open_store

RUNS = "runs"
CONFIG_FILE = "config.json"
LEASE_FILE = "lease.json"
METRICS_DIR = "metrics"
LEGACY_METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "plots/loss.png"
CHECKPOINTS = "checkpoints"
HF_DIR = "hf"
EVAL_DIR = "eval"
EVAL_LOG = "eval.jsonl"
EVAL_PLOT = "plots/eval.png"
COMMIT = "COMMIT"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_METRICS_SEGMENT = re.compile(rf"^{METRICS_DIR}/(\d+)-(\d+)\.jsonl$")
_TENSORBOARD_SEGMENT = re.compile(rf"^{TENSORBOARD_DIR}/events\.out\.tfevents\.step-(\d+)-(\d+)$")


class Segment(NamedTuple):
    """One appended piece of a run's metrics or TensorBoard events: steps `first` to `last`."""

    first: int
    last: int
    key: str


@dataclass(frozen=True)
class RunLayout:
    """A run folder on a store; `store` is rooted at the run folder itself."""

    store: Store

    @classmethod
    def of(cls, output: str, name: str) -> RunLayout:
        """The run `name` under the store `output` (a path or a store URI): <output>/runs/<name>."""
        return cls(open_store(output).child(join_key(RUNS, name)))

    @classmethod
    def at(cls, run_uri: str) -> RunLayout:
        return cls(open_store(run_uri))

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def config_uri(self) -> str:
        return self.store.url(CONFIG_FILE)

    def write_config(self, config_json: str) -> str:
        """Write the run config (once per launch, by the launcher); returns its URI for the workers."""
        self.store.put_text(CONFIG_FILE, config_json)
        return self.config_uri

    def read_config(self) -> str:
        """The run config's JSON text; raises ObjectNotFound if the run was never started."""
        return self.store.get_text(CONFIG_FILE)

    @staticmethod
    def checkpoint(step: int) -> str:
        """The folder key of the checkpoint at `step`."""
        return join_key(CHECKPOINTS, f"step-{step:07d}")

    @staticmethod
    def corrupt_checkpoint(step: int, stamp: str) -> str:
        """Where a corrupt checkpoint's folder is set aside (`stamp`: when): out of the step-NNNNNNN
        names, so no resume loads it, no prune deletes it and no save of its step overwrites it."""
        return join_key(CHECKPOINTS, f"step-{step:07d}.corrupt-{stamp}")

    @staticmethod
    def evaluation(step: int) -> str:
        """The key of the evaluation results of the checkpoint at `step`."""
        return join_key(EVAL_DIR, f"step-{step:07d}.json")

    @staticmethod
    def metrics_segment(first: int, last: int) -> str:
        """The key of the metrics records of steps `first` to `last` (zero-padded: listed in step order)."""
        return join_key(METRICS_DIR, f"{first:010d}-{last:010d}.jsonl")

    @staticmethod
    def tensorboard_segment(first: int, last: int) -> str:
        """The key of the TensorBoard events of steps `first` to `last`. TensorBoard reads a folder's
        event files in name order: "step-" sorts after the timestamps of the files of earlier runs."""
        return join_key(TENSORBOARD_DIR, f"events.out.tfevents.step-{first:010d}-{last:010d}")

    def metrics_segments(self) -> tuple[list[Segment], bool]:
        """The run's metrics segments by first step, and whether it has a LEGACY_METRICS_FILE (older
        than every segment): one listing of both."""
        listed = list(self.store.list(METRICS_DIR))
        return _segments(listed, _METRICS_SEGMENT), LEGACY_METRICS_FILE in listed

    def tensorboard_segments(self) -> list[Segment]:
        """The run's TensorBoard segments by first step (event files of older runs are not segments)."""
        return _segments(self.store.list(TENSORBOARD_DIR + "/"), _TENSORBOARD_SEGMENT)

    @staticmethod
    def commit_marker(folder: str) -> str:
        return join_key(folder, COMMIT)

    def checkpoint_steps(self) -> list[int]:
        """The steps of the checkpoint folders, complete or not, in order: one folder listing (a page
        per 1,000 folders), whatever the number of files they hold. Set-aside folders are not steps."""
        return sorted(int(match.group(1)) for name in self.store.list_folders(CHECKPOINTS)
                      if (match := _STEP_FOLDER.match(name)))

    @staticmethod
    def split_checkpoint_uri(uri: str) -> tuple[str, int] | None:
        """(run URI, step) of a checkpoint folder URI <run>/checkpoints/step-NNNNNNN, else None."""
        run_uri, _, folder = uri.rstrip("/").rpartition(f"/{CHECKPOINTS}/")
        match = _STEP_FOLDER.match(folder)
        if not run_uri or not match:
            return None
        return run_uri, int(match.group(1))


def _segments(keys: Iterable[str], pattern: re.Pattern) -> list[Segment]:
    found = [Segment(int(m.group(1)), int(m.group(2)), key) for key in keys if (m := pattern.match(key))]
    return sorted(found)
