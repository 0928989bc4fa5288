"""Rank 0's metrics: every step in appended segments, a log line every `log_every` steps, progress
on the store; a resume drops what a crash left past its checkpoint."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import model.metrics
from model.metrics import MetricsLog, last_record, read_metrics, read_progress
from storage.run_layout import LEGACY_METRICS_FILE, TENSORBOARD_DIR, RunLayout
from storage.store import LocalStore


class CountingStore(LocalStore):
    """A local store that counts the bytes each key was written with."""

    def __init__(self, root):
        super().__init__(root)
        self.written: dict[str, int] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.written[key] = self.written.get(key, 0) + len(data)
        super().put_bytes(key, data)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.written[key] = self.written.get(key, 0) + Path(path).stat().st_size
        super().put_file(key, path)


def record(step: int, loss: float | None = None) -> dict:
    return {"step": step, "loss": 5.0 - step / 100 if loss is None else loss, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 1000.0, "mfu": None}


def train(metrics: MetricsLog, steps: range, every: int, loss: float | None = None) -> None:
    """Log `steps`, uploading before each would-be checkpoint (every `every` steps and at the end)."""
    for step in steps:
        metrics.log(record(step, loss), checkpoint=step % every == 0 or step == steps[-1])
        if step % every == 0 or step == steps[-1]:
            metrics.upload()


def tensorboard_losses(store: LocalStore) -> dict[int, float]:
    """train/loss by step, as TensorBoard reads the run's event files (every file of the folder, in name order)."""
    events = EventAccumulator(str(store.local_path(TENSORBOARD_DIR)), purge_orphaned_data=True)
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert len(steps) == len(set(steps)), steps  # each step once
    return {event.step: event.value for event in events.Scalars("train/loss")}


def test_every_step_is_recorded_but_the_log_and_the_store_see_a_few(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(model.metrics, "PROGRESS_EVERY_S", 3600.0)  # only the first step and uploads
    store = LocalStore(tmp_path / "run")
    assert read_progress(store) is None and last_record(store) is None
    metrics = MetricsLog(tmp_path / "local", store, resume_step=0, log_every=10, max_steps=25)
    with caplog.at_level(logging.INFO, logger="model.metrics"):
        for step in range(1, 26):
            metrics.log({**record(step), **({"val_loss": 4.0} if step == 12 else {})}, checkpoint=step == 15)
            if step == 1:
                assert read_progress(store).latest["step"] == 1  # the first step at once
        assert read_progress(store).latest["step"] == 1  # then not at every step
        metrics.upload()
    metrics.close()

    progress = read_progress(store)
    assert progress.latest["step"] == 25
    assert [r["step"] for r in progress.logged] == [1, 10, 12, 15, 20]  # log lines and validations
    assert [r["step"] for r in read_metrics(store)] == list(range(1, 26))
    assert last_record(store)["step"] == 25
    logged = [m.split()[1] for m in caplog.messages if m.startswith("step ")]
    assert logged == ["1/25", "10/25", "15/25", "20/25"]


def test_each_upload_writes_only_its_new_records_and_events(tmp_path):
    store = CountingStore(tmp_path / "run")
    metrics = MetricsLog(tmp_path / "local", store, resume_step=0)
    written = []
    for upload in range(10):
        before = dict(store.written)
        train(metrics, range(upload * 10 + 1, upload * 10 + 11), every=10)
        written.append({key: size - before.get(key, 0) for key, size in store.written.items() if size != before.get(key)})
    metrics.close()

    layout = RunLayout(store)
    second, tenth = written[1], written[9]
    assert set(tenth) == {layout.metrics_segment(91, 100), layout.tensorboard_segment(91, 100), "progress.json"}
    for key in (layout.metrics_segment, layout.tensorboard_segment):
        assert tenth[key(91, 100)] == store.size(key(91, 100))  # each object written once, whole
        assert abs(tenth[key(91, 100)] - second[key(11, 20)]) <= 0.02 * second[key(11, 20)]  # flat, not growing
    assert [r["step"] for r in read_metrics(store)] == list(range(1, 101))
    assert sorted(tensorboard_losses(store)) == list(range(1, 101))  # TensorBoard reads the segments as one run


def test_a_resume_drops_what_a_crash_left_past_the_checkpoint(tmp_path):
    store = LocalStore(tmp_path / "run")
    crashed = MetricsLog(tmp_path / "local", store, resume_step=0)
    train(crashed, range(1, 31), every=10, loss=9.0)  # the job dies after uploading step 30, before its commit
    resumed = MetricsLog(tmp_path / "local", store, resume_step=20)  # the newest committed checkpoint: step 20
    assert [r["step"] for r in read_metrics(store)] == list(range(1, 21))
    train(resumed, range(21, 36), every=10, loss=1.0)
    resumed.close()

    records = read_metrics(store)
    assert [r["step"] for r in records] == list(range(1, 36))
    assert [r["loss"] for r in records] == [9.0] * 20 + [1.0] * 15
    assert tensorboard_losses(store) == {step: 9.0 if step <= 20 else 1.0 for step in range(1, 36)}
    assert [(s.first, s.last) for s in RunLayout(store).metrics_segments()[0]] == [(1, 10), (11, 20), (21, 30), (31, 35)]


def test_a_segment_straddling_the_resumed_step_is_superseded_from_there(tmp_path):
    """A checkpoint copied in from elsewhere at step 20, where no segment ends."""
    store = LocalStore(tmp_path / "run")
    earlier = MetricsLog(tmp_path / "local", store, resume_step=0)
    train(earlier, range(1, 31), every=15, loss=9.0)
    resumed = MetricsLog(tmp_path / "local", store, resume_step=20)
    train(resumed, range(21, 26), every=10, loss=1.0)
    resumed.close()
    records = read_metrics(store)
    assert [r["step"] for r in records] == list(range(1, 26))
    assert [r["loss"] for r in records] == [9.0] * 20 + [1.0] * 5
    assert last_record(store)["step"] == 25
    assert tensorboard_losses(store) == {step: 9.0 if step <= 20 else 1.0 for step in range(1, 26)}


def test_a_run_from_before_segments_is_read_then_folded_into_one_at_its_resume(tmp_path):
    store = LocalStore(tmp_path / "run")
    lines = "".join(json.dumps(record(step)) + "\n" for step in range(1, 13))
    store.put_text(LEGACY_METRICS_FILE, lines + '{"step": 13, "lo')  # torn by a crash mid-write
    assert [r["step"] for r in read_metrics(store)] == list(range(1, 13))
    assert last_record(store)["step"] == 12

    resumed = MetricsLog(tmp_path / "local", store, resume_step=10)
    assert not store.exists(LEGACY_METRICS_FILE)
    assert [(s.first, s.last) for s in RunLayout(store).metrics_segments()[0]] == [(1, 10)]
    train(resumed, range(11, 16), every=5, loss=1.0)
    resumed.close()
    assert [r["loss"] for r in read_metrics(store)] == [record(s)["loss"] for s in range(1, 11)] + [1.0] * 5
