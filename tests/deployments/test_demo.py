"""`tinyllama demo --quick` as `make demo` runs it: from another folder, no Prefect server named
(a temporary one on the data folder's database); its summary checked against the files it made
and the runs in that database."""

from __future__ import annotations

import ast
import json
import re
import sqlite3

import pytest

from deployments.demo import PROMPT, QUICK
from flows.pretrain import manifest_uri
from model.metrics import METRICS_FILE, read_metrics
from storage.store import open_object, open_store
from tasks.config import BuildConfig
from tests.deployments.test_cli import cli, without_prefect


# What the quick demo printed before these were silenced: Prefect's hook and task-completion
# lines, Ray's start-up notices, transformers' generation warning (from the export's own
# generation_config.json) and tqdm redraws.
NOISE = re.compile(
    r"Running hook|finished running successfully|Task run '[^']*' - Finished in state Completed\(\)"
    r"|Token authentication|Started a local Ray instance|max_new_tokens|it/s\]|\r"
)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    done = cli("--data", "data", "demo", "--quick", cwd=folder, env=without_prefect())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, folder / "data"


@pytest.mark.slow
def test_the_quick_demo_runs_the_whole_path_and_its_summary_says_what_it_made(quick_demo):
    done, data = quick_demo
    summary = done.stdout[done.stdout.index("Demo finished in"):]
    printed = dict(re.findall(r"^  (\w[\w ]*?)  +(\S.*)$", summary, re.MULTILINE))

    build = BuildConfig.from_yaml(data / QUICK.corpus / "sample.yaml").model_copy(
        update={"output": str(data), "name": QUICK.build})
    assert printed["sample corpus"].startswith(f"{data / QUICK.corpus}  ")
    assert printed["dataset"] == manifest_uri(build)
    store, key = open_object(manifest_uri(build))
    assert json.loads(store.get_text(key))["name"] == QUICK.build

    run = open_store(data).child(f"runs/{QUICK.run}")
    records = read_metrics(run.get_text(METRICS_FILE))
    assert [r["step"] for r in records] == list(range(1, QUICK.steps + 1))
    assert printed["training run"] == (
        f"{run.uri}  (step {QUICK.steps}, loss {records[0]['loss']:.2f} -> {records[-1]['loss']:.2f};"
    )
    export = run.local_path("hf")
    assert printed["HF export"].startswith(f"{export}  ") and (export / "config.json").exists()
    assert ast.literal_eval(printed["generated"]).startswith(PROMPT)  # transformers' greedy continuation
    (evaluation,) = [json.loads(line) for line in run.get_text("eval.jsonl").splitlines()]
    assert evaluation["step"] == QUICK.steps and evaluation["tasks"] == ["tiny_mc"]
    scores = ", ".join(f"{m['task']} {m['metric']} {m['value']:.3f} ± {m['stderr']:.3f}" for m in evaluation["metrics"])
    assert printed["evaluation"].startswith(f"{scores}  (")

    # The runs are in the data folder's Prefect database, for `tinyllama serve` to show later.
    with sqlite3.connect(data / "prefect" / "prefect.db") as db:
        runs = dict(db.execute("select name, state_type from flow_run").fetchall())
    assert runs == {
        f"pretrain-{QUICK.build}": "COMPLETED", f"build-{QUICK.build}": "COMPLETED", f"train-{QUICK.run}": "COMPLETED",
        f"evaluate-{QUICK.run}": "COMPLETED",
    }


@pytest.mark.slow
def test_the_quick_demo_prints_what_a_user_wants_and_nothing_else(quick_demo):
    """Within 40 lines: no engine chatter, library notices or progress-bar redraws, in the
    terminal or in the Prefect logs the UI shows."""
    done, data = quick_demo
    output = done.stdout + done.stderr
    assert len(output.splitlines()) <= 40, output
    assert not NOISE.search(output), NOISE.search(output)
    with sqlite3.connect(data / "prefect" / "prefect.db") as db:
        logged = [f"{name}: {message}" for name, message in db.execute("select name, message from log")]
    assert logged and not [line for line in logged if NOISE.search(line) or line.endswith("Completed()")
                           and line.startswith("prefect.task_runs")]
