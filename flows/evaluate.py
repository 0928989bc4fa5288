"""Flow `evaluate`: score a training checkpoint with lm-evaluation-harness (see tasks/evaluate.py)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.cancellation import cancel_task_and_subflow_runs
from storage.run_layout import RunLayout
from tasks.evaluate import evaluate_task


def evaluate_run_name() -> str:
    """evaluate-<run> for a run folder, evaluate-<run>-step-N for one of its checkpoints."""
    checkpoint = flow_run.parameters["checkpoint"].rstrip("/")
    if split := RunLayout.split_checkpoint_uri(checkpoint):
        run, step = split
        return f"evaluate-{run.rstrip('/').rsplit('/', 1)[-1]}-step-{step}"
    return f"evaluate-{checkpoint.rsplit('/', 1)[-1]}"


@flow(name="evaluate", flow_run_name=evaluate_run_name, on_cancellation=[cancel_task_and_subflow_runs])
def evaluate(
    checkpoint: str,
    tasks: list[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Export a checkpoint and evaluate it offline; returns the evaluation record.

    Args:
        checkpoint: A checkpoint folder, or a run folder (its newest complete checkpoint).
        tasks: lm-eval task names, from its registry or from YAML files under include_path.
        include_path: A folder of task YAMLs (local data: dataset_path json, data_files).
        num_fewshot: Few-shot examples per item (default: each task's own).
        limit: At most this many items per task.
        batch_size: Items per forward pass.
    """
    return evaluate_task(checkpoint, tasks, include_path, num_fewshot, limit, batch_size)
