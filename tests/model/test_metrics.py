"""Rank 0's metrics: every step in metrics.jsonl, a log line every `log_every` steps, progress on the store."""

from __future__ import annotations

import logging

import model.metrics
from model.metrics import METRICS_FILE, MetricsLog, read_metrics, read_progress
from storage.store import open_store


def record(step: int) -> dict:
    return {"step": step, "loss": 5.0 - step / 100, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0, "mfu": None}


def test_every_step_is_recorded_but_the_log_and_the_store_see_a_few(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(model.metrics, "PROGRESS_EVERY_S", 3600.0)  # only the first step and uploads
    store = open_store(str(tmp_path / "run"))
    assert read_progress(store) is None
    metrics = MetricsLog(tmp_path / "local", store, resume_step=0, log_every=10, max_steps=25)
    with caplog.at_level(logging.INFO, logger="model.metrics"):
        for step in range(1, 26):
            metrics.log(record(step), checkpoint=step == 15)
            if step == 1:
                assert read_progress(store)["step"] == 1  # the first step at once
        assert read_progress(store)["step"] == 1  # then not at every step
        metrics.upload()
    metrics.close()

    assert read_progress(store)["step"] == 25
    assert [r["step"] for r in read_metrics(store.get_text(METRICS_FILE))] == list(range(1, 26))
    logged = [m.split()[1] for m in caplog.messages if m.startswith("step ")]
    assert logged == ["1/25", "10/25", "15/25", "20/25"]
