"""What a training run shows on its Prefect flow-run page, with no server beside Prefect's:

- a live status per segment (one invocation of the training program, `max_steps_this_run` steps
  at most): a progress bar from 0 to 100% of this segment's steps, not of the run's, whose
  description says both:
  `step 120 of 2000 (this segment: 50/100) · loss 5.431 · 8.2k tokens/s · MFU 31.0% · ETA 1m05s`;
- a live card per run (a markdown artifact that each poll edits in place, a version per segment):
  the segment's status, the loss (and validation loss) as a chart and a table of the logged
  steps, with tokens/s and MFU; once the segment is done, the commands that export and evaluate it;
- the final metrics, rounded, times readable;
- the loss curve as an image embedded in a markdown artifact (a data: URI: the browser shows it
  whatever the store is; a `file://` link it would refuse).
"""

from __future__ import annotations

import base64
import functools
import io
import math
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from model.train_config import Evaluation
from storage.store import Store
from tasks.evaluate import PAPER_ACC_NORM

# An embedded plot beyond this size is linked instead (artifacts live in Prefect's database).
MAX_EMBEDDED_PLOT_BYTES = 2 << 20
LIVE_ROWS = 30
CHART_INCHES, CHART_DPI = (7.0, 2.6), 90  # the live card's loss chart: 630 x 234 pixels, ~20 KB


@dataclass
class SegmentStatus:
    """The status of one training segment: from `start_step` (the run's step when it began) to
    `stop_step` (where this invocation stops), of a run of `max_steps`."""

    start_step: int
    stop_step: int
    max_steps: int
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, start_step: int, max_steps: int, max_steps_this_run: int | None) -> SegmentStatus:
        stop = min(max_steps, start_step + max_steps_this_run) if max_steps_this_run else max_steps
        return cls(start_step, max(stop, start_step), max_steps)

    def percent(self, step: int) -> float:
        span = self.stop_step - self.start_step
        return 100.0 if span <= 0 else max(0.0, min(100.0, 100.0 * (step - self.start_step) / span))

    def describe(self, record: dict | None) -> str:
        step = record["step"] if record else self.start_step
        segment = f"{step - self.start_step}/{self.stop_step - self.start_step}"
        parts = [f"step {step} of {self.max_steps} (this segment: {segment})"]
        if record:
            if (loss := record.get("loss")) is not None:
                parts.append(f"loss {loss:.3f}")
            if (speed := record.get("tokens_per_s")) is not None:
                parts.append(f"{_si(speed)} tokens/s")
            if (mfu := record.get("mfu")) is not None:
                parts.append(f"MFU {100 * mfu:.1f}%")
            done = step - self.start_step
            if 0 < done < self.stop_step - self.start_step:
                remaining = (time.monotonic() - self.started) / done * (self.stop_step - step)
                parts.append(f"ETA {duration(remaining)}")
        if step >= self.stop_step:
            parts.append("segment done")
        return " · ".join(parts)


@dataclass
class LiveView:
    """The live card of run `name` for one segment: the logged steps read from its progress."""

    name: str
    segment: SegmentStatus
    latest: dict | None = None
    rows: dict[int, dict] = field(default_factory=dict)  # logged step -> its record

    def add(self, latest: dict, logged: list[dict]) -> bool:
        """Take in what a poll of the run's progress read; True if the card has changed."""
        changed = latest != self.latest
        self.latest = latest
        for record in logged:
            if self.segment.start_step < record["step"] and self.rows.get(record["step"]) != record:
                self.rows[record["step"]] = record
                changed = True
        # Steps past the latest are a crashed invocation's, read before this one's first progress.
        for step in [step for step in self.rows if step > latest["step"]]:
            del self.rows[step]
        return changed

    def markdown(self, next_steps: list[str] | None = None, status: str | None = None) -> str:
        """The card: status (the segment's progress unless given), a loss chart, the logged steps
        (LIVE_ROWS at most, evenly spread, the newest always), and `next_steps` (commands) when given."""
        lines = [f"### {self.name}: training", "", status or self.segment.describe(self.latest)]
        records = [self.rows[step] for step in sorted(self.rows)]
        if records:
            lines += ["", loss_chart(records)]
        spans = [f"{label} {values[0]:.3f} → {values[-1]:.3f}" for label, name in (("loss", "loss"), ("validation loss", "val_loss"))
                 if (values := [r[name] for r in records if r.get(name) is not None])]
        if spans:
            lines += ["", " · ".join(spans)]
        if records:
            columns = [("step", "step"), ("loss", "loss"), ("validation loss", "val_loss"),
                       ("tokens/s", "tokens_per_s"), ("MFU", "mfu")]
            columns = [(label, name) for label, name in columns if any(r.get(name) is not None for r in records)]
            lines += ["", "| " + " | ".join(label for label, _ in columns) + " |",
                      "|" + " ---: |" * len(columns)]
            for record in thin(records, LIVE_ROWS):
                lines.append("| " + " | ".join(_cell(name, record.get(name)) for _, name in columns) + " |")
        if next_steps:
            lines += ["", "#### Next steps", "", "```bash", *next_steps, "```"]
        return "\n".join(lines)


def next_steps(run_uri: str, name: str, evaluation: Evaluation | None) -> list[str]:
    """The commands that export the run's newest checkpoint and score it (the paper's tasks, or the
    run's own evaluation section)."""
    if evaluation is None:
        evaluate = f"--tasks {','.join(PAPER_ACC_NORM)} --num-fewshot 0"
    else:
        evaluate = f"--tasks {','.join(evaluation.tasks)}"
        for option, value in (("include-path", evaluation.include_path), ("num-fewshot", evaluation.num_fewshot),
                              ("limit", evaluation.limit)):
            if value is not None:
                evaluate += f" --{option} {shlex.quote(str(value))}"
    run = shlex.quote(run_uri)
    return [f"tinyllama export-hf {run} {shlex.quote(f'./{name}-hf')}", f"tinyllama evaluate {run} {evaluate}"]


@functools.cache
def chart_backend() -> tuple[type, type]:
    """matplotlib's Agg canvas and Figure, imported once. The training task imports them before
    its job starts: a cancel's SIGTERM that lands inside a C extension's import (matplotlib's
    ft2font, seconds under load) comes out of it as ImportError, a failure, not the cancel it is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg, Figure


def loss_chart(records: list[dict]) -> str:
    """The loss (and validation loss) of the logged steps `records` as a small chart: markdown
    with the PNG inline. (Block-character sparklines, as before, came out a flat grey band in the
    UI's code font.)"""
    FigureCanvasAgg, Figure = chart_backend()
    figure = Figure(figsize=CHART_INCHES, dpi=CHART_DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="loss", linewidth=1.2)
    if val := [r for r in records if r.get("val_loss") is not None]:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return f"![loss curve](data:image/png;base64,{base64.b64encode(png.getvalue()).decode('ascii')})"


def thin(items: list, most: int) -> list:
    """At most `most` of `items`, evenly spread, the first and the last kept."""
    if len(items) <= most:
        return items
    return [items[round(i * (len(items) - 1) / (most - 1))] for i in range(most)]


def _cell(name: str, value) -> str:
    if value is None:
        return ""
    if name == "step":
        return f"{value:,}"
    if name == "mfu":
        return f"{100 * value:.1f}%"
    if name == "tokens_per_s":
        return _si(value)
    return f"{value:.4f}"


def metrics_rows(record: dict) -> list[dict[str, str]]:
    """The metrics of one step as table rows: values rounded, times readable, unknowns left out."""
    rows = []
    for name, value in record.items():
        if value is None:
            continue
        if name == "time":
            shown = datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        elif name.endswith("_s") and name != "tokens_per_s":
            shown = duration(value)
        elif name == "mfu":
            shown = f"{100 * value:.1f}%"
        elif isinstance(value, float):
            shown = _round(value)
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        rows.append({"metric": name, "value": shown})
    return rows


def loss_curve_markdown(run_store: Store, plot_key: str, title: str) -> str:
    """Markdown showing the run's loss plot inline (or a link, if there is no plot or it is huge)."""
    uri = run_store.url(plot_key)
    try:
        png = run_store.get_bytes(plot_key)
    except FileNotFoundError:
        return f"### {title}\n\nNo loss plot yet at `{uri}`."
    if len(png) > MAX_EMBEDDED_PLOT_BYTES:
        return f"### {title}\n\nThe plot is at `{uri}`."
    data = base64.b64encode(png).decode("ascii")
    return f"### {title}\n\n![loss curve](data:image/png;base64,{data})\n\n`{uri}`"


def duration(seconds: float) -> str:
    """3.2 -> '3.2s', 65 -> '1m05s', 7300 -> '2h01m'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _round(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
