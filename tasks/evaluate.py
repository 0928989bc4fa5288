"""Evaluation: a checkpoint's Hugging Face export scored by lm-evaluation-harness, offline.

The checkpoint is exported (model/export.py) to a temporary folder and loaded by lm-eval's
HFLM in-process; tasks come from the harness's registry or from YAML files under
`include_path` (`dataset_path: json` + `data_files` for local data). Nothing is downloaded:
HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set, so a registry task whose data is not in the
Hugging Face cache fails with the dataset's name. Results go to the run folder:
`eval/step-NNNNNNN.json` (lm-eval's results for that checkpoint), one line per evaluation in
`eval.jsonl`, and `plots/eval.png` (each metric against tokens seen).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from model.checkpoint import CheckpointError, read_values, resolve_checkpoint
from model.export import export_hf
from model.metrics import parse_records
from model.train_config import Evaluation
from storage.run_layout import EVAL_LOG, EVAL_PLOT, RunLayout
from storage.store import ObjectNotFound, Store
from tasks.reporting import artifact_key

# TinyLlama 1.1B at 3T tokens (arXiv 2401.02385, Table 2): acc_norm, lm-evaluation-harness, zero-shot.
PAPER_ACC_NORM = {
    "hellaswag": 59.20, "openbookqa": 36.00, "winogrande": 59.12, "arc_challenge": 30.12,
    "arc_easy": 55.25, "boolq": 57.83, "piqa": 73.29,
}


def go_offline() -> None:
    """No network: the harness and `datasets` read only local files and caches."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_DATASETS_OFFLINE = True  # read at import: the process may have imported datasets already
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


@lru_cache(maxsize=4)
def _indexed_tasks(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager with the local task folder; ValueError naming tasks it does not know.
    Indexing the registry's thousands of YAMLs takes most of a minute on a small CPU, so tasks all
    found under `include_path` are run from an index of that folder alone."""
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ValueError(f"include path {include_path} is not a folder")
        local = _indexed_tasks(include_path, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = _indexed_tasks(include_path, include_defaults=True)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        where = f"the harness's registry or {include_path}" if include_path else "the harness's registry"
        raise ValueError(f"unknown evaluation task(s) {', '.join(unknown)}: not in {where}")
    return manager


def chance_by_task(requests) -> dict[str, float]:
    """Random-guess accuracy per task, the mean over its items of 1 / choices, from the harness's
    loglikelihood requests (one per choice of an item; acc_mutual_info's extra ones have no context)."""
    choices = Counter((r.task_name, r.doc_id) for r in requests if r.args[0])
    by_task: dict[str, list[float]] = {}
    for (task_name, _), count in choices.items():
        by_task.setdefault(task_name, []).append(1 / count)
    return {task_name: sum(values) / len(values) for task_name, values in by_task.items()}


def metric_rows(results: dict) -> list[dict]:
    """One row per (task, metric): value, stderr, chance (accuracies of multiple-choice tasks) and the
    paper's acc_norm for its seven tasks."""
    rows = []
    for name, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            paper = PAPER_ACC_NORM.get(name) if metric == "acc_norm" else None
            rows.append({
                "task": name, "metric": metric, "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "chance": results.get("chance", {}).get(name) if metric in ("acc", "acc_norm") else None,
                "paper": paper / 100 if paper is not None else None,
            })
    return rows


def run_harness(
    export: Path, tasks: list[str], include_path: str | None, num_fewshot: int | None, limit: int | None,
    batch_size: int,
) -> dict:
    """lm-eval's results of the exported model on `tasks` (HFLM in-process, seeded, offline)."""
    go_offline()
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    chance: dict[str, float] = {}

    class QuietHFLM(HFLM):
        """HFLM without its tqdm bars (lm-eval passes disable=False explicitly, over TQDM_DISABLE):
        in a log stream or the Prefect UI each redraw is another garbled line. It notes each task's
        chance accuracy from the requests it scores."""

        def loglikelihood(self, requests, disable_tqdm=True):
            chance.update(chance_by_task(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=True):
            return super().generate_until(requests, disable_tqdm=True)

    manager = task_manager(tasks, include_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = QuietHFLM(pretrained=str(export), device=device, dtype="float32", batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=False, bootstrap_iters=1000,
    )
    multiple_choice = {name for name, config in results.get("configs", {}).items()
                       if config.get("output_type") == "multiple_choice"}
    return {**{key: results[key] for key in ("results", "n-shot", "versions", "n-samples") if key in results},
            "chance": {name: value for name, value in chance.items() if name in multiple_choice}}


def evaluate_checkpoint(
    checkpoint_uri: str, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
    limit: int | None = None, batch_size: int = 8,
) -> dict:
    """Evaluate a checkpoint folder (or a run's newest checkpoint); record and return the evaluation."""
    if not tasks:
        raise ValueError("no evaluation tasks given")
    task_manager(tasks, include_path)  # an unknown task fails before the export's work
    try:
        layout, checkpoint = resolve_checkpoint(checkpoint_uri)
    except ObjectNotFound as e:
        raise CheckpointError(f"{checkpoint_uri}: no such checkpoint or run ({e})") from None
    store = layout.store
    progress = read_values(store, checkpoint, "progress")
    with tempfile.TemporaryDirectory(prefix="tinyllama-eval-") as tmp:
        export = export_hf(store.url(checkpoint.prefix), Path(tmp) / "hf")
        results = run_harness(export, tasks, include_path, num_fewshot, limit, batch_size)
    record = {
        "run": json.loads(layout.read_config())["name"], "step": checkpoint.step, "tokens": progress["tokens_seen"],
        "checkpoint": store.url(checkpoint.prefix), "tasks": tasks, "num_fewshot": num_fewshot, "limit": limit,
        "metrics": metric_rows(results),
    }
    store.put_text(RunLayout.evaluation(checkpoint.step), json.dumps({**record, "lm_eval": results}, indent=2) + "\n")
    append_record(store, record)
    plot_evaluations(store)
    return record


def read_evaluations(store: Store) -> list[dict]:
    try:
        return parse_records(store.get_text(EVAL_LOG))
    except ObjectNotFound:
        return []


def append_record(store: Store, record: dict) -> None:
    lines = [json.dumps(r, sort_keys=True) for r in [*read_evaluations(store), record]]
    store.put_text(EVAL_LOG, "\n".join(lines) + "\n")


def plot_evaluations(store: Store) -> None:
    """plots/eval.png: every (task, metric) of eval.jsonl against tokens seen, stderr as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for record in read_evaluations(store):
        for row in record["metrics"]:
            series.setdefault(f"{row['task']} {row['metric']}", []).append(
                (record["tokens"], row["value"], row["stderr"] or 0.0)
            )
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, points in sorted(series.items()):
        tokens, values, errors = zip(*sorted(points))
        axes.errorbar(tokens, values, yerr=errors, marker="o", capsize=3, label=label)
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("score")
    axes.legend(fontsize="small")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        store.put_file(EVAL_PLOT, path)
    plt.close(figure)


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


@task(name="evaluate")
def evaluate_task(
    checkpoint_uri: str, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
    limit: int | None = None, batch_size: int = 8,
) -> dict:
    """Evaluate a checkpoint and show its metrics (with the paper's beside them) as a table artifact."""
    record = evaluate_checkpoint(checkpoint_uri, tasks, include_path, num_fewshot, limit, batch_size)
    run = record["run"]
    create_table_artifact(
        eval_table(record["metrics"]),
        key=artifact_key(run, "eval"),
        description=f"{run}: lm-evaluation-harness at step {record['step']} ({record['tokens']} tokens), percent",
    )
    return record


def eval_table(metrics: list[dict]) -> list[dict]:
    """The rows of an evaluation's table artifact, in percent: value, stderr, chance (random guessing)
    and the paper's."""
    return [
        {"task": r["task"], "metric": r["metric"], "value": percent(r["value"]), "stderr": percent(r["stderr"]),
         "chance": percent(r.get("chance")), "TinyLlama 1.1B (3T tokens)": percent(r["paper"])}
        for r in metrics
    ]


def evaluate_segment(run_uri: str, evaluation: Evaluation) -> dict | None:
    """Evaluate the checkpoint a training segment ended with. A failure is logged and reported by
    the failed task run, never raised: the checkpoint is committed and the next segment runs."""
    try:
        return evaluate_task(run_uri, **evaluation.model_dump())
    except Exception as error:  # noqa: BLE001 - evaluation must not fail the training flow
        get_run_logger().error("evaluation of %s failed (training is unaffected): %s", run_uri, error)
        return None
