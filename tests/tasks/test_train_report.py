"""What a training run shows in the Prefect UI: the segment status, the live card, rounded metrics, the
inline loss curve."""

from __future__ import annotations

import base64
import re

from model.train_config import Evaluation
from tasks.train_report import LIVE_ROWS, LiveView, SegmentStatus, duration, loss_curve_markdown, metrics_rows, next_steps


def test_a_segment_runs_from_0_to_100_percent_of_its_own_steps():
    segment = SegmentStatus.of(start_step=1950, max_steps=2000, max_steps_this_run=100)
    assert (segment.start_step, segment.stop_step) == (1950, 2000)  # the run's end comes first
    segment = SegmentStatus.of(start_step=1000, max_steps=2000, max_steps_this_run=50)
    assert [segment.percent(step) for step in (1000, 1025, 1050)] == [0.0, 50.0, 100.0]
    record = {"step": 1025, "loss": 5.43219, "tokens_per_s": 8213.7, "mfu": 0.3104}
    text = segment.describe(record)
    assert text.startswith("step 1025 of 2000 (this segment: 25/50) · loss 5.432 · 8.2k tokens/s · MFU 31.0% · ETA ")
    assert "MFU" not in segment.describe({**record, "mfu": None})  # unknown on CPU: left out
    assert segment.describe({**record, "step": 1050}).endswith("segment done")


def test_a_first_segment_of_a_long_run_is_done_at_its_own_last_step_not_the_runs():
    """The demo's first segment: 120 steps of a 2000-step run reads 100% with the run's step beside it."""
    segment = SegmentStatus.of(start_step=0, max_steps=2000, max_steps_this_run=120)
    assert segment.describe(None) == "step 0 of 2000 (this segment: 0/120)"
    assert segment.percent(60) == 50.0 and segment.percent(120) == 100.0
    done = segment.describe({"step": 120, "loss": 6.0})
    assert done == "step 120 of 2000 (this segment: 120/120) · loss 6.000 · segment done"
    whole_run = SegmentStatus.of(start_step=0, max_steps=2000, max_steps_this_run=None)
    assert whole_run.percent(120) == 6.0 and whole_run.describe({"step": 120}).startswith("step 120 of 2000 (this segment: 120/2000)")


def test_final_metrics_are_rounded_and_times_readable():
    rows = metrics_rows({"step": 12000, "loss": 0.000994459753267812, "mfu": None, "step_time_s": 65.2,
                         "time": 1764547200.5, "lr": 4e-4})
    assert rows == [
        {"metric": "step", "value": "12,000"},
        {"metric": "loss", "value": "0.0009945"},
        {"metric": "step_time_s", "value": "1m05s"},
        {"metric": "time", "value": "2025-12-01 00:00:00 UTC"},
        {"metric": "lr", "value": "0.0004"},
    ]
    assert [duration(s) for s in (3.25, 42, 7300)] == ["3.2s", "42s", "2h01m"]


def test_the_loss_curve_is_embedded_as_a_data_uri(store):
    assert "No loss plot yet" in loss_curve_markdown(store, "plots/loss.png", "r: loss curve")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    store.put_bytes("plots/loss.png", png)
    text = loss_curve_markdown(store, "plots/loss.png", "r: loss curve")
    assert f"![loss curve](data:image/png;base64,{base64.b64encode(png).decode()})" in text
    assert store.url("plots/loss.png") in text


def step(n: int, **extra) -> dict:
    return {"step": n, "loss": 6.0 - n / 100, "tokens_per_s": 8200.0, "mfu": None, **extra}


def test_the_live_card_shows_the_segments_logged_steps_thinned_and_the_next_steps_at_the_end():
    live = LiveView("r", SegmentStatus.of(start_step=100, max_steps=1000, max_steps_this_run=None))
    assert live.add(step(110), [step(100), step(110)])  # 100: the previous segment's
    assert not live.add(step(110), [step(110)])  # nothing new: no edit
    assert live.add(step(120, val_loss=5.5), [step(110), step(120, val_loss=5.5)])
    text = live.markdown()
    assert text.splitlines()[2].startswith("step 120 of 1000 (this segment: 20/900) · loss 4.800 · 8.2k tokens/s")
    assert "| step | loss | validation loss | tokens/s |" in text and "MFU" not in text  # unknown MFU left out
    assert "| 110 | 4.9000 |  | 8.2k |" in text and "| 120 | 4.8000 | 5.5000 | 8.2k |" in text
    assert "| 100 |" not in text and "loss 4.900 → 4.800 · validation loss 5.500 → 5.500" in text
    chart = re.search(r"!\[loss curve\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert chart and base64.b64decode(chart[1]).startswith(b"\x89PNG")

    for n in range(130, 1010, 10):
        live.add(step(n), [step(n)])
    rows = [line for line in live.markdown().splitlines() if line[:3].strip("| ").isdigit()]
    assert len(rows) == LIVE_ROWS and rows[0].startswith("| 110 |") and rows[-1].startswith("| 1,000 |")
    assert "loss 4.900 → -4.000 · validation" in live.markdown()  # the span: every logged step, not the rows shown
    assert live.markdown(status="cancelled at step 1000; checkpoint step 990 kept").splitlines()[2] == (
        "cancelled at step 1000; checkpoint step 990 kept")

    steps = next_steps("s3://b/runs/r", "r", None)
    assert steps == ["tinyllama export-hf s3://b/runs/r ./r-hf",
                     "tinyllama evaluate s3://b/runs/r --tasks hellaswag,openbookqa,winogrande,arc_challenge,arc_easy,"
                     "boolq,piqa --num-fewshot 0"]
    assert live.markdown(steps).endswith("#### Next steps\n\n```bash\n" + "\n".join(steps) + "\n```")
    own = next_steps("/runs/r", "r", Evaluation(tasks=["tiny_mc"], include_path="/t", limit=8))
    assert own[1] == "tinyllama evaluate /runs/r --tasks tiny_mc --include-path /t --limit 8"


def test_the_live_card_drops_a_crashed_invocations_steps_past_the_resumed_one():
    live = LiveView("r", SegmentStatus.of(start_step=20, max_steps=100, max_steps_this_run=None))
    live.add(step(35), [step(30), step(35)])  # progress.json as the crash left it
    live.add(step(22), [step(21), step(22)])  # this invocation's first
    assert sorted(live.rows) == [21, 22]
