"""`tinyllama demo --quick` as `make demo` runs it: from another folder, no Prefect server named
(a temporary one on the data folder's database); its summary checked against the files it made
and the runs in that database."""

from __future__ import annotations

import collections
import json
import re
import sqlite3
from pathlib import Path

import pytest

from deployments.demo import BUILD_ID, PROMPT, QUICK, DemoResult, generate, print_summary
from flows.pretrain import manifest_uri
from model.metrics import read_metrics
from storage.manifest import SourceAccounting, read_manifest
from storage.store import open_object, open_store
from tasks.config import BuildConfig
from tests.deployments.test_cli import cli, without_prefect

GENERATED = re.compile(r'"(.*)"  \(sampled, seed \d+\)')


# What the quick demo printed before these were silenced: Prefect's hook and run-completion
# lines, links to the temporary server's UI (it stops with the command), Ray's start-up
# notices, transformers' generation warning (from the export's own generation_config.json) and
# tqdm redraws.
NOISE = re.compile(
    r"Running hook|finished running successfully|Finished in state Completed\(\)|View at http"
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
        update={"output": str(data), "name": QUICK.build, "build_id": BUILD_ID})
    assert printed["sample corpus"].startswith(f"{data / QUICK.corpus}  ")
    assert printed["dataset"] == manifest_uri(build)
    store, key = open_object(manifest_uri(build))
    manifest = read_manifest(store, key)
    assert manifest.name == QUICK.build
    total = sum(manifest.sources.values(), SourceAccounting())
    planted = json.loads((data / QUICK.corpus / "corpus.json").read_text())
    assert total.near_dup == len(planted["near_duplicates"]) > 0  # the corpus's planted near copies, removed
    assert (f"{total.kept} of {total.docs_in} documents kept; removed: {total.exact_dup} exact and {total.near_dup} "
            "near duplicates") in summary
    assert re.search(r"a near duplicate \(Jaccard 0\.(8|9)\d with the one kept\): \"", summary)

    run = open_store(data).child(f"runs/{QUICK.run}")
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, QUICK.steps + 1))
    assert printed["training run"] == (
        f"{run.uri}  (step {QUICK.steps}, loss {records[0]['loss']:.2f} -> {records[-1]['loss']:.2f};"
    )
    export = run.local_path("hf")
    assert printed["HF export"].startswith(f"{export}  ") and (export / "config.json").exists()
    generated = GENERATED.fullmatch(printed["generated"])[1]
    assert generated == generate(export).replace("\n", "⏎")  # seeded: the same text again
    continuation = generated.removeprefix(PROMPT)
    assert generated.startswith(PROMPT) and continuation.strip("⏎ ")
    assert collections.Counter(continuation.split()).most_common(1)[0][1] <= len(continuation.split()) // 2  # not one repeat
    (evaluation,) = [json.loads(line) for line in run.get_text("eval.jsonl").splitlines()]
    assert evaluation["step"] == QUICK.steps and evaluation["tasks"] == ["tiny_mc"]
    scores = ", ".join(f"{m['task']} {m['metric']} {m['value']:.3f} ± {m['stderr']:.3f}" for m in evaluation["metrics"])
    assert printed["evaluation"].startswith(f"{scores}  (")
    # a temporary Prefect server recorded the runs in the data folder: serve shows them afterwards
    assert printed["Prefect UI"].startswith("run `tinyllama serve`, then open http://127.0.0.1:4200 : these runs")

    # The runs are in the data folder's Prefect database, for `tinyllama serve` to show later.
    with sqlite3.connect(data / "prefect" / "prefect.db") as db:
        runs = dict(db.execute("select name, state_type from flow_run").fetchall())
    assert runs == {
        f"pretrain-{QUICK.build}": "COMPLETED", f"build-{QUICK.build}": "COMPLETED", f"train-{QUICK.run}": "COMPLETED",
        f"evaluate-{QUICK.run}": "COMPLETED",
    }


@pytest.mark.slow
def test_the_quick_demo_prints_what_a_user_wants_and_nothing_else(quick_demo):
    """Within 40 lines (the summary's two of dedup included): no engine chatter, library notices or
    progress-bar redraws, in the terminal or in the Prefect logs the UI shows (which keep the
    links to the runs' pages: `tinyllama serve` shows them later)."""
    done, data = quick_demo
    output = done.stdout + done.stderr
    assert len(output.splitlines()) <= 40, output
    assert not NOISE.search(output), NOISE.search(output)
    with sqlite3.connect(data / "prefect" / "prefect.db") as db:
        logged = [f"{name}: {message}" for name, message in db.execute("select name, message from log")]
    assert logged and not [line for line in logged if NOISE.search(line) and "View at http" not in line]


def summary(capsys, **changes) -> str:
    result = DemoResult(
        corpus=Path("/d/raw"), manifest="/d/datasets/sample/b1/manifest.json",
        accounting=SourceAccounting(docs_in=100, kept=90, filtered=4, exact_dup=4, near_dup=2),
        near_duplicate={"text": "The history of\nPython " * 5, "kept_text": "", "jaccard": 0.912},
        run="/d/runs/sample-tiny", step=120, first_loss=8.0, last_loss=5.0, export=Path("/d/runs/sample-tiny/hf"),
        generated="The history of the\n\nmodule", seconds=75,
        evaluation={"metrics": [{"task": "tiny_mc", "metric": "acc", "value": 0.3, "stderr": 0.07}]},
    )
    print_summary(DemoResult(**{**result.__dict__, **changes}))
    return capsys.readouterr().out


def test_the_summary_names_the_ui_that_shows_the_runs_and_what_dedup_removed(capsys):
    served = summary(capsys, ui_url="http://127.0.0.1:4321")
    assert "  Prefect UI     open http://127.0.0.1:4321 : these runs" in served and "4200" not in served
    temporary = summary(capsys, ui_url=None)  # its database is the data folder's, which serve serves on 4200
    assert "  Prefect UI     run `tinyllama serve`, then open http://127.0.0.1:4200 : these runs" in temporary

    assert "90 of 100 documents kept; removed: 4 exact and 2 near duplicates, 4 filtered" in served
    assert 'a near duplicate (Jaccard 0.91 with the one kept): "The history of⏎Python The history of⏎Python The history of⏎P…"' in served
    assert '  generated      "The history of the⏎⏎module"  (sampled, seed 0)' in served
    assert "near duplicate (" not in summary(capsys, near_duplicate=None)
