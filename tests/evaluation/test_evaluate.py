"""Evaluation with lm-evaluation-harness of a demo-sized model, alone and after training segments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.evaluate import evaluate
from flows.train_epoch import train_epoch
from model.checkpoint import CheckpointError
from storage.store import open_store
from prefect import flow

from model.train_config import Evaluation
from storage.run_layout import EVAL_LOG, EVAL_PLOT, RunLayout
from tasks.evaluate import evaluate_checkpoint, evaluate_segment
from tests.evaluation.runs import evaluable_build
from tests.model.runs import train_config
from flows.train import train

REPO = Path(__file__).resolve().parents[2]
TASKS = str(REPO / "demo" / "tiny_mc")
ITEMS = 40


@pytest.fixture(scope="module")
def trained_run(prefect_server, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval-run")
    config = train_config(
        "eval-run", str(root / "out"), evaluable_build(str(root / "data")), root,
        launcher={"kind": "torchrun", "nproc": 1},
    )
    return train(config)


@pytest.mark.slow
def test_harness_scores_a_multiple_choice_task_reproducibly(trained_run, monkeypatch):
    monkeypatch.chdir(REPO)  # the task's data_files are relative to the repository root
    first = evaluate(trained_run, ["tiny_mc"], include_path=TASKS)
    second = evaluate_checkpoint(trained_run, ["tiny_mc"], include_path=TASKS)
    assert first["metrics"] == second["metrics"]  # same checkpoint, same numbers
    rows = {row["metric"]: row for row in first["metrics"]}
    assert {"acc", "acc_norm"} <= rows.keys()
    assert rows["acc"]["chance"] == rows["acc_norm"]["chance"] == 0.25  # 4 choices an item
    for row in rows.values():
        assert 0 <= row["value"] <= 1 and 0 < row["stderr"] <= 1
        assert row["value"] * ITEMS == pytest.approx(round(row["value"] * ITEMS))  # a count of items right
    store = open_store(trained_run)
    stored = json.loads(store.get_text(RunLayout.evaluation(first["step"])))
    assert stored["lm_eval"]["results"]["tiny_mc"]["acc,none"] == rows["acc"]["value"]
    assert stored["lm_eval"]["n-samples"]["tiny_mc"]["effective"] == ITEMS
    assert store.exists(EVAL_PLOT) and len(store.get_text(EVAL_LOG).splitlines()) == 2


def test_missing_checkpoint_or_unknown_task_is_a_clear_error(trained_run, tmp_path):
    missing = str(tmp_path / "no-such-run")
    with pytest.raises(CheckpointError, match=missing):
        evaluate_checkpoint(missing, ["tiny_mc"], include_path=TASKS)
    with pytest.raises(ValueError, match="unknown evaluation task.*no_such_task"):
        evaluate_checkpoint(trained_run, ["no_such_task"], include_path=TASKS)


@pytest.mark.slow
def test_train_epoch_segments_with_evaluation_leave_one_record_per_segment(prefect_server, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    root = tmp_path
    config = train_config(
        "eval-epochs", str(root / "out"), evaluable_build(str(root / "data")), root,
        launcher={"kind": "torchrun", "nproc": 1},
        eval={"tasks": ["tiny_mc"], "include_path": TASKS, "limit": 8},
    )
    train(config.model_copy(update={"max_steps_this_run": 2}))  # the first segment starts the run
    train_epoch("eval-epochs", output=str(root / "out"), steps=2)
    store = open_store(config.run_uri)
    records = [json.loads(line) for line in store.get_text(EVAL_LOG).splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert records[0]["tokens"] < records[1]["tokens"]
    assert store.exists(RunLayout.evaluation(2)) and store.exists(RunLayout.evaluation(4))


def test_a_failed_segment_evaluation_is_reported_not_raised(prefect_server, tmp_path, caplog):
    @flow
    def segment_end(run_uri: str) -> str:
        evaluate_segment(run_uri, Evaluation(tasks=["tiny_mc"], include_path=TASKS))
        return "training continues"

    missing = str(tmp_path / "gone")
    assert segment_end(missing) == "training continues"
    assert any("evaluation of" in r.getMessage() and missing in r.getMessage() for r in caplog.records)
