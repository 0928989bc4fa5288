"""What the Prefect UI shows of each deployment: its description (the Description tab) and each
parameter's help in the run form. The UI renders both as markdown with raw HTML dropped, so an
`<output>` outside a code span would vanish; CommonMark's parser says what is taken as HTML."""

from __future__ import annotations

from pathlib import Path

from markdown_it import MarkdownIt
from prefect.utilities.callables import parameter_schema

from deployments.deploy import TRAIN_EPOCH, deployments, sample_training
from flows.build_dataset import build_dataset
from flows.evaluate import evaluate
from flows.pretrain import pretrain, train_on_build
from flows.train_epoch import train_epoch
from tasks.config import BuildConfig

FLOWS = [build_dataset, pretrain, train_on_build, train_epoch, evaluate]


def html_in(markdown: str) -> list[str]:
    """The raw HTML a markdown renderer would meet in `markdown` (what the UI drops)."""
    tokens = MarkdownIt("commonmark").parse(markdown)
    return [t.content for token in tokens for t in [token, *(token.children or [])] if t.type.startswith("html")]


def test_descriptions_and_parameter_help_render_without_losing_text(tmp_path):
    build = BuildConfig.model_validate(
        {"name": "sample", "output": str(tmp_path), "sources": [{"name": "web", "uri": str(tmp_path / "*.jsonl"), "format": "jsonl"}]}
    )
    declared = {f"{d.flow_name}/{d.name}": d for d in deployments(build, sample_training(Path(tmp_path)))}
    assert len(declared) == len(FLOWS)
    for name, deployment in declared.items():
        assert deployment.description and "Args:" not in deployment.description, name  # the form shows the args
        assert html_in(deployment.description) == [], name
    for flow in FLOWS:
        for parameter, schema in parameter_schema(flow.fn).properties.items():
            assert schema.get("description") and html_in(schema["description"]) == [], (flow.name, parameter)

    assert declared[TRAIN_EPOCH].description == train_epoch.description.split("\n\n")[0]
    run_help = parameter_schema(train_epoch.fn).properties["run"]["description"]
    assert run_help == "The run's name: its folder is `runs/<run>` in the output store."
    assert html_in("The run's name: it lives in <output>/runs/<run>/.") == ["<output>", "<run>"]  # what was lost
