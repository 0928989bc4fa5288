"""Rank 0's training metrics: metrics.jsonl, TensorBoard, and a loss-curve plot.

Everything is written to a local run folder as training goes and copied to the run folder on
the store just before every checkpoint's commit (an invocation always ends with one), so the
store holds the metrics of every committed step:

    <run>/metrics.jsonl        one JSON object per optimizer step (step, loss, lr, tokens, ...)
    <run>/tensorboard/         TensorBoard event files
    <run>/plots/loss.png       training (and validation) loss against step

A resumed run starts from the store's metrics.jsonl cut at the checkpoint's step, so steps
that ran after the checkpoint and are now repeated appear once; TensorBoard hides them too
(SummaryWriter's purge_step).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from storage.run_layout import LOSS_PLOT, METRICS_FILE, PROGRESS_FILE, TENSORBOARD_DIR
from storage.store import ObjectNotFound, Store, join_key

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


def read_metrics(text: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl text (a torn last line, from a crash mid-write, is dropped)."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_progress(store: Store) -> dict[str, Any] | None:
    """The latest record rank 0 put on the run store (None before the first step)."""
    try:
        return json.loads(store.get_text(PROGRESS_FILE))
    except (ObjectNotFound, json.JSONDecodeError):
        return None


def step_line(record: dict[str, Any], max_steps: int) -> str:
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
    """metrics.jsonl + TensorBoard for one invocation of a run, resumed after `resume_step`;
    a log line every `log_every` steps (of `max_steps`) and the progress record on the store."""

    def __init__(self, local_dir: Path, store: Store, resume_step: int, log_every: int = 1, max_steps: int = 0):
        self.local_dir, self.store = local_dir, store
        self.log_every, self.max_steps = log_every, max_steps
        self._progress_at = -math.inf
        self._last: dict[str, Any] | None = None
        self.path = local_dir / METRICS_FILE
        self.tensorboard_dir = local_dir / TENSORBOARD_DIR
        self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        try:
            earlier = read_metrics(store.get_text(METRICS_FILE))
        except ObjectNotFound:
            earlier = []
        kept = [r for r in earlier if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._uploaded: dict[Path, tuple[int, int]] = {}  # what the store holds, by local file
        for key in store.list(TENSORBOARD_DIR + "/"):
            local = local_dir / key
            if not local.exists():
                store.download(key, local)
                self._uploaded[local] = _signature(local)
        from torch.utils.tensorboard import SummaryWriter  # here: readers of metrics.jsonl need no TensorBoard

        self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=resume_step + 1)
        self._file = open(self.path, "a")

    def log(self, record: dict[str, Any], checkpoint: bool = False) -> None:
        """Record a step; `checkpoint`: a checkpoint follows it (always worth a log line)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{name}" if not name.startswith("val_") else f"val/{name[4:]}",
                                       value, record["step"])
        if checkpoint or record["step"] % self.log_every == 0 or self._last is None:
            log.info("%s", step_line(record, self.max_steps))
        self._last = record
        if time.monotonic() - self._progress_at >= PROGRESS_EVERY_S:
            self._put_progress()

    def _put_progress(self) -> None:
        if self._last is not None:
            self.store.put_text(PROGRESS_FILE, json.dumps(self._last))
            self._progress_at = time.monotonic()

    def upload(self) -> None:
        """Copy metrics.jsonl, the progress record and the TensorBoard files to the run folder on the store."""
        self.writer.flush()
        self.store.put_file(METRICS_FILE, self.path)
        self._put_progress()
        for path in self._tensorboard_files():
            if self._uploaded.get(path) != (signature := _signature(path)):  # event files of earlier runs never change
                self.store.put_file(join_key(TENSORBOARD_DIR, path.relative_to(self.tensorboard_dir).as_posix()), path)
                self._uploaded[path] = signature

    def _tensorboard_files(self) -> list[Path]:
        return [path for path in sorted(self.tensorboard_dir.rglob("*")) if path.is_file()]

    def plot(self) -> Path:
        """Draw the loss curve of the whole run so far and upload it to <run>/plots/loss.png."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: like SummaryWriter above
        from matplotlib.figure import Figure

        records = read_metrics(self.path.read_text())
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
        self._file.close()
        self.writer.close()


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
