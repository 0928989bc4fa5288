"""The evaluation table: a chance column (random-guess accuracy, 1 / choices per item) beside the scores."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

from tasks.evaluate import chance_by_task, eval_table, metric_rows


def requests(task: str, choices_per_item: list[int], mutual_info: bool = False) -> list[Instance]:
    """The loglikelihood requests the harness makes for a multiple-choice task: one per choice of an
    item (and, with acc_mutual_info, one more per choice without the context)."""
    made = []
    for doc_id, choices in enumerate(choices_per_item):
        for choice in range(choices):
            made.append(Instance("loglikelihood", {}, ("Question?", f" answer {choice}"), choice, (task, doc_id, 1)))
            if mutual_info:
                made.append(Instance("loglikelihood", {}, ("", f" answer {choice}"), choice, (task, doc_id, 1)))
    return made


def test_chance_is_the_mean_over_items_of_one_over_their_choices():
    chance = chance_by_task(requests("four_way", [4, 4, 4]) + requests("mixed", [2, 4], mutual_info=True))
    assert chance == {"four_way": 0.25, "mixed": pytest.approx((0.5 + 0.25) / 2)}


def test_the_table_has_a_chance_column_for_accuracies():
    results = {
        "results": {"tiny_mc": {"acc,none": 0.3, "acc_stderr,none": 0.07, "acc_norm,none": 0.275,
                                "acc_norm_stderr,none": 0.07, "brier_score,none": 0.8}},
        "chance": {"tiny_mc": 0.25},
    }
    table = eval_table(metric_rows(results))
    assert [(row["metric"], row["value"], row["chance"]) for row in table] == [
        ("acc", "30.00", "25.00"), ("acc_norm", "27.50", "25.00"), ("brier_score", "80.00", ""),
    ]
    assert list(table[0]) == ["task", "metric", "value", "stderr", "chance", "TinyLlama 1.1B (3T tokens)"]
    assert eval_table([{**metric_rows(results)[0], "chance": None}])[0]["chance"] == ""  # not multiple choice
