"""What a training run shows on its Prefect flow-run page, with no server beside Prefect's:

- a live status per segment (one invocation of the training program, `max_steps_this_run` steps
  at most): a progress bar from 0 to 100% of this segment's steps, not of the run's, whose
  description says both:
  `step 120 of 2000 (this segment: 50/100) · loss 5.431 · 8.2k tokens/s · MFU 31.0% · ETA 1m05s`;
- the final metrics, rounded, times readable;
- the loss curve as an image embedded in a markdown artifact (a data: URI: the browser shows it
  whatever the store is; a `file://` link it would refuse).
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from storage.store import Store

# An embedded plot beyond this size is linked instead (artifacts live in Prefect's database).
MAX_EMBEDDED_PLOT_BYTES = 2 << 20


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
