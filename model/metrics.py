"""Rank 0's training metrics: metrics segments, TensorBoard, progress, and a loss-curve plot.

Records and TensorBoard events are kept since the last upload and appended to the run folder on
the store as new objects just before every checkpoint's commit (an invocation always ends with
one), so the store holds the metrics of every committed step and an upload costs what it adds:

    <run>/metrics/FFFFFFFFFF-LLLLLLLLLL.jsonl   one JSON object per optimizer step, steps F..L
    <run>/tensorboard/events.out.tfevents.step-FFFFFFFFFF-LLLLLLLLLL   their TensorBoard events
    <run>/progress.json                         the latest record and the recent logged ones
    <run>/plots/loss.png                        training (and validation) loss against step

A resumed run first deletes the segments that start after its checkpoint's step (what a crash
left past it), so repeated steps appear once. Every upload precedes a checkpoint, so segments end
at checkpoint steps; should one straddle the resumed step all the same (a checkpoint copied from
elsewhere), it is not rewritten: the next segment starts at the resumed step + 1 and supersedes it
from there, for readers of the records as for TensorBoard (SummaryWriter's purge_step). A run's
records from before segments (one metrics.jsonl) are read first, and folded into a segment at
its next resume.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from storage.run_layout import LEGACY_METRICS_FILE, LOSS_PLOT, PROGRESS_FILE, TENSORBOARD_DIR, RunLayout
from storage.store import ObjectNotFound, Store

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
RECENT_LOGGED = 64  # logged records in progress.json: the Prefect view's rows between two of its polls
READ_THREADS = 16


class StepMetrics(TypedDict, total=False):
    """One optimizer step's record, as written to the metrics segments."""

    step: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    grad_norm: float
    mfu: float | None  # None without a known peak (CPUs)
    step_time_s: float
    time: float  # Unix time at the step's end
    val_loss: float  # only at validation steps


@dataclass(frozen=True)
class Progress:
    """progress.json: the latest step's record and the last RECENT_LOGGED logged ones (log lines,
    validations), oldest first."""

    latest: StepMetrics
    logged: list[StepMetrics]


def parse_records(text: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines text (a torn last line, from a crash mid-write, is dropped)."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(store: Store) -> list[StepMetrics]:
    """Every step's record of the run at `store`, in step order: one listing, then one GET per
    segment (READ_THREADS at a time). A segment starting at step s supersedes earlier records from
    s on (what a resume from step s - 1 writes)."""
    segments, legacy = RunLayout(store).metrics_segments()
    keys = ([LEGACY_METRICS_FILE] if legacy else []) + [segment.key for segment in segments]
    with ThreadPoolExecutor(min(READ_THREADS, max(len(keys), 1))) as pool:
        texts = list(pool.map(store.get_text, keys))
    records: list[StepMetrics] = parse_records(texts[0]) if legacy else []
    for segment, text in zip(segments, texts[1:] if legacy else texts):
        records = [r for r in records if r["step"] < segment.first] + parse_records(text)
    return records


def last_record(store: Store) -> StepMetrics | None:
    """The run's latest recorded step (None before its first upload): one listing, one GET."""
    segments, legacy = RunLayout(store).metrics_segments()
    if not segments and not legacy:
        return None
    records = parse_records(store.get_text(segments[-1].key if segments else LEGACY_METRICS_FILE))
    return records[-1] if records else None


def read_progress(store: Store) -> Progress | None:
    """What rank 0 last put on the run store (None before the first step)."""
    try:
        data = json.loads(store.get_text(PROGRESS_FILE))
    except (ObjectNotFound, json.JSONDecodeError):
        return None
    return Progress(data["latest"], data["logged"])


def step_line(record: StepMetrics, max_steps: int) -> str:
    line = (
        f"step {record['step']}/{max_steps} loss {record['loss']:.4f} lr {record['lr']:.3g} "
        f"grad_norm {record['grad_norm']:.3f} {record['tokens_per_s']:.0f} tokens/s"
    )
    if record.get("mfu") is not None:
        line += f" mfu {record['mfu']:.1%}"
    if record.get("val_loss") is not None:
        line += f" val_loss {record['val_loss']:.4f}"
    return line


class MetricsLog:
    """Metrics segments + TensorBoard for one invocation of a run, resumed after `resume_step`;
    a log line every `log_every` steps (of `max_steps`) and the progress record on the store."""

    def __init__(self, local_dir: Path, store: Store, resume_step: int, log_every: int = 1, max_steps: int = 0):
        self.local_dir, self.store, self.layout = local_dir, store, RunLayout(store)
        self.log_every, self.max_steps = log_every, max_steps
        self._progress_at = -math.inf
        self._last: StepMetrics | None = None
        self._recent: deque[StepMetrics] = deque(maxlen=RECENT_LOGGED)
        self._pending: list[StepMetrics] = []  # recorded since the last upload
        # The event file of the segment being written; one a crash left here was never uploaded.
        self.tensorboard_dir = local_dir / TENSORBOARD_DIR
        shutil.rmtree(self.tensorboard_dir, ignore_errors=True)
        self.tensorboard_dir.mkdir(parents=True)
        self._writer = None
        self._purge_step: int | None = resume_step + 1  # TensorBoard hides a straddling segment's later steps
        self._cut(resume_step)

    def _cut(self, resume_step: int) -> None:
        """Delete the segments a crashed invocation stored past `resume_step`; fold a metrics.jsonl
        (cut at `resume_step`) into a segment."""
        segments, legacy = self.layout.metrics_segments()
        later = [s.key for s in segments + self.layout.tensorboard_segments() if s.first > resume_step]
        if legacy:
            kept = [r for r in parse_records(self.store.get_text(LEGACY_METRICS_FILE)) if r["step"] <= resume_step]
            if kept:
                self.store.put_bytes(self.layout.metrics_segment(kept[0]["step"], kept[-1]["step"]), _jsonl(kept))
            later.append(LEGACY_METRICS_FILE)
        self.store.delete_many(later)

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # here: readers of the metrics need no TensorBoard

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer

    def log(self, record: StepMetrics, checkpoint: bool = False) -> None:
        """Record a step; `checkpoint`: a checkpoint follows it (always worth a log line)."""
        self._pending.append(record)
        writer = self._tensorboard()
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                writer.add_scalar(f"train/{name}" if not name.startswith("val_") else f"val/{name[4:]}",
                                  value, record["step"])
        logged = checkpoint or record["step"] % self.log_every == 0 or self._last is None
        if logged:
            log.info("%s", step_line(record, self.max_steps))
        if logged or record.get("val_loss") is not None:
            self._recent.append(record)
        self._last = record
        if time.monotonic() - self._progress_at >= PROGRESS_EVERY_S:
            self._put_progress()

    def _put_progress(self) -> None:
        if self._last is not None:
            self.store.put_text(PROGRESS_FILE, json.dumps({"latest": self._last, "logged": list(self._recent)}))
            self._progress_at = time.monotonic()

    def upload(self) -> None:
        """Append the records and TensorBoard events since the last upload to the run folder on the
        store, each as a new segment, and put the progress record."""
        if self._pending:
            first, last = self._pending[0]["step"], self._pending[-1]["step"]
            self._writer.close()  # its event file is complete: a segment TensorBoard reads alone
            (events,) = self.tensorboard_dir.glob("events.out.tfevents.*")
            self.store.put_file(self.layout.tensorboard_segment(first, last), events)
            events.unlink()
            self._writer = None
            self.store.put_bytes(self.layout.metrics_segment(first, last), _jsonl(self._pending))
            self._pending = []
        self._put_progress()

    def plot(self) -> Path:
        """Draw the loss curve of the whole run so far and upload it to <run>/plots/loss.png."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: like SummaryWriter above
        from matplotlib.figure import Figure

        records = read_metrics(self.store)
        figure = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", linewidth=1)
        val = [r for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.local_dir / LOSS_PLOT
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        self.store.put_file(LOSS_PLOT, path)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _jsonl(records: list[StepMetrics]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()
