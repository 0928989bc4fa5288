"""Every `tinyllama` command as a user runs it, chained on one sample corpus, one `tinyllama serve`
and one training run, each checked against facts read directly (the corpus library, the manifest
file, metrics.jsonl, the Prefect API, transformers).

`tinyllama serve` is pointed at the port of the session's Prefect server, so it attaches to it
(as it does to any server already on its port) instead of starting one; the commands run with the
same --data and no server named, so they find it through the address serve records there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

import pytest
import yaml

from demo.sample_corpus import make_sample_corpus
from deployments.deploy import BUILD, EVALUATE, PRETRAIN, TRAIN_EPOCH, TRAIN_ON_BUILD, submit
from deployments.serve import SERVED_FILE, healthy
from flows.pretrain import manifest_uri
from model.checkpoint import latest_checkpoint
from model.metrics import read_metrics
from storage.store import open_object, open_store
from tasks.config import BuildConfig
from tests.builds import load_shards
from tests.deployments.conftest import SEGMENT, tiny_training
from tests.deployments.test_cli import TEMPORARY_SERVER_LINE, start_cli, without_prefect
from tests.deployments.test_cli import cli as run_cli

CORPUS_BYTES, CORPUS_SEED = 96 << 10, 5
CLI_RUN = "cli-run"  # trained by `tinyllama train`, continued by `tinyllama train-epoch`
CLI_STEPS, EPOCH_STEPS = 3, 2
STARTUP_TIMEOUT_S = 180

pytestmark = pytest.mark.slow  # a chain: most of the cost is in the module's fixtures (serve, pretrain, train)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command, run to success in a fresh terminal's environment."""
    done = run_cli(*args, env=without_prefect())
    assert done.returncode == 0, f"tinyllama {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def client():
    """A client of the session's Prefect server (the one serve attaches to)."""
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_runs(**filters):
    from prefect.client.schemas.filters import FlowRunFilter

    with client() as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(**filters))


def runs_named(name: str):
    from prefect.client.schemas.filters import FlowRunFilterName

    return flow_runs(name=FlowRunFilterName(any_=[name]))


def flow_run(flow_run_id: UUID):
    with client() as c:
        return c.read_flow_run(flow_run_id)


@dataclass
class Corpus:
    root: Path
    printed: list[str]  # make-corpus's output lines
    build_yaml: Path  # its sample.yaml made small: vocab 512, no near dedup, built into `data`
    build: BuildConfig
    data: Path  # the --data folder of every command


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("commands")
    data = root / "data"
    done = cli("--data", str(data), "make-corpus", str(root / "raw"), "--target-bytes", str(CORPUS_BYTES),
               "--seed", str(CORPUS_SEED))
    config = yaml.safe_load((root / "raw" / "sample.yaml").read_text())
    config.update(output=str(data), tokenizer={"train": {"vocab_size": 512}}, dedup={"exact": True, "near": False})
    build_yaml = root / "build.yaml"
    build_yaml.write_text(yaml.safe_dump(config))
    return Corpus(root, done.stdout.splitlines(), build_yaml, BuildConfig.model_validate(config), data)


@dataclass
class Serve:
    process: subprocess.Popen
    log: Path
    api_url: str  # as serve names it: --host and --port
    train_yaml: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def serve(corpus, prefect_server) -> Iterator[Serve]:
    """`tinyllama serve` with every flag, on the port of the session's server and its host's name.

    --epochs-on switches the hourly schedule on in the database only: the session's server is
    Prefect's ephemeral one, which runs no scheduler service, so no epoch starts on its own."""
    port = urlsplit(prefect_server).port
    train_yaml = corpus.root / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(tiny_training(corpus.data, corpus.root / "work")))
    log = corpus.root / "serve.log"
    process = start_cli("--data", str(corpus.data), "serve", "--host", "localhost", "--port", str(port),
                        "--build-config", str(corpus.build_yaml), "--train-config", str(train_yaml), "--epochs-on",
                        "--no-train-after-build", env=without_prefect(PREFECT_RUNNER_POLL_FREQUENCY="1"), log=log)
    served = Serve(process, log, f"http://localhost:{port}/api", train_yaml)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "Prefect UI:" not in served.output() or not registered(EVALUATE):
            assert process.poll() is None, f"serve exited {process.returncode}:\n{served.output()}"
            assert time.monotonic() < deadline, f"serve did not register its deployments:\n{served.output()}"
            time.sleep(0.5)
        yield served
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def registered(deployment: str) -> bool:
    from prefect.exceptions import ObjectNotFound

    try:
        with client() as c:
            c.read_deployment_by_name(deployment)
    except ObjectNotFound:
        return False
    return True


def test_make_corpus_writes_the_librarys_corpus_and_prints_its_config(corpus, tmp_path):
    reference = make_sample_corpus(tmp_path / "raw", target_bytes=CORPUS_BYTES, seed=CORPUS_SEED)
    made = corpus.root / "raw"
    assert corpus.printed == [f"sample corpus in {made}: {reference['documents']}", str(made / "sample.yaml")]
    files = sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file() and p.suffix != ".yaml")
    assert files == sorted(p.relative_to(tmp_path / "raw") for p in (tmp_path / "raw").rglob("*")
                           if p.is_file() and p.suffix != ".yaml")
    for name in files:
        if name.name != "corpus.json":
            assert (made / name).read_bytes() == (tmp_path / "raw" / name).read_bytes(), name
    summary = json.loads((made / "corpus.json").read_text())
    assert summary["root"] == str(made) and {**summary, "root": None, "config": None} == {
        **reference, "root": None, "config": None}
    sources = BuildConfig.from_yaml(made / "sample.yaml").sources
    assert [s.uri for s in sources] == [str(made / "slimpajama/*.jsonl.zst"), str(made / "starcoder/*.parquet")]


def test_serve_attaches_to_the_server_on_its_port_and_registers_what_its_flags_say(serve, corpus, prefect_server):
    output = serve.output()
    assert f"attaching to the Prefect server already running at {serve.api_url}" in output  # --host, --port
    assert "starting a Prefect server" not in output
    assert f"Prefect UI: {serve.api_url.removesuffix('/api')}" in output
    recorded = json.loads((corpus.data / SERVED_FILE).read_text())
    assert recorded == {"api_url": serve.api_url, "pid": serve.process.pid}

    with client() as c:
        build = c.read_deployment_by_name(BUILD)
        epoch = c.read_deployment_by_name(TRAIN_EPOCH)
        pretrain = c.read_deployment_by_name(PRETRAIN)
        on_build = c.read_deployment_by_name(TRAIN_ON_BUILD)
        (automation,) = c.read_resource_related_automations(f"prefect.deployment.{on_build.id}")
    assert build.parameters["config"] == corpus.build.model_dump(mode="json")  # --build-config
    train = yaml.safe_load(serve.train_yaml.read_text())
    assert {k: pretrain.parameters["train"][k] for k in ("name", "output", "model_overrides", "global_batch_tokens")} \
        == {k: train[k] for k in ("name", "output", "model_overrides", "global_batch_tokens")}  # --train-config
    assert epoch.parameters["run"] == train["name"]
    assert [s.active for s in epoch.schedules] == [True]  # --epochs-on
    assert not automation.enabled  # --no-train-after-build


@pytest.fixture(scope="module")
def pretrained(serve, corpus):
    """A run of the pretrain deployment with its default parameters (serve's --build-config and
    --train-config), through the API, waited for."""
    return submit(PRETRAIN, {}, wait=True)


def test_the_pretrain_deployment_builds_then_trains_on_the_build(pretrained, serve, corpus):
    assert pretrained.state.is_completed(), f"{pretrained.state.name}: {pretrained.state.message}\n{serve.output()[-3000:]}"
    from prefect.client.schemas.filters import FlowRunFilterParentFlowRunId

    subflows = flow_runs(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pretrained.id]))
    by_name = {run.name: run for run in subflows}
    train_name = yaml.safe_load(serve.train_yaml.read_text())["name"]
    assert sorted(by_name) == [f"build-{corpus.build.name}", f"train-{train_name}"]
    assert all(run.state.is_completed() for run in subflows)
    build_run, train_run = by_name[f"build-{corpus.build.name}"], by_name[f"train-{train_name}"]
    assert build_run.start_time < train_run.start_time
    assert [d["manifest"] for d in train_run.parameters["config"]["data"]] == [manifest_uri(corpus.build)]

    manifest_store, manifest_key = open_object(manifest_uri(corpus.build))
    assert manifest_store.exists(manifest_key)
    records = read_metrics(open_store(corpus.data).child(f"runs/{train_name}"))
    assert [r["step"] for r in records] == list(range(1, SEGMENT + 1))


def test_inspect_prints_the_manifests_accounting_and_shards(pretrained, corpus):
    uri = manifest_uri(corpus.build)
    store, key = open_object(uri)
    manifest = json.loads(store.get_text(key))
    lines = cli("inspect", uri).stdout.splitlines()

    table = load_shards(uri)
    shards = [table.shard(i).model_dump() for i in range(len(table))]
    assert lines[0] == (
        f"build {manifest['name']}/{manifest['build_id']}: {sum(s['documents'] for s in shards)} documents, "
        f"{sum(s['tokens'] for s in shards)} tokens in {len(shards)} shards ({manifest['dtype']}), "
        f"tokenizer {manifest['tokenizer']['sha256'][:12]} vocab {manifest['tokenizer']['vocab_size']}"
    )
    header = lines[1].split()
    assert header[0] == "source"
    rows = {row.split()[0]: row.split()[1:] for row in lines[2 : 2 + len(manifest["sources"])]}
    assert rows == {name: [str(acc[column]) for column in header[1:]] for name, acc in manifest["sources"].items()}
    assert lines[2 + len(manifest["sources"])].split()[:3] == ["shard", "documents", "tokens"]
    printed_shards = [row.split() for row in lines[3 + len(manifest["sources"]) :]]
    assert printed_shards == [
        [s["prefix"], str(s["documents"]), str(s["tokens"]), s["bin"]["sha256"][:16]] for s in shards
    ]


@pytest.fixture(scope="module")
def cli_trained(pretrained, corpus, serve) -> subprocess.CompletedProcess:
    """`tinyllama train` of a new run on the pretrain's build, --max-steps-this-run over its config's."""
    config = {**tiny_training(corpus.data, corpus.root / "work"), "name": CLI_RUN, "max_steps_this_run": 1,
              "data": [{"manifest": manifest_uri(corpus.build)}]}
    run_yaml = corpus.root / "cli-run.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    return cli("--data", str(corpus.data), "train", str(run_yaml), "--max-steps-this-run", str(CLI_STEPS))


def test_train_prints_the_run_its_steps_and_records_on_serves_server(cli_trained, corpus, serve):
    run = open_store(corpus.data).child(f"runs/{CLI_RUN}")
    assert cli_trained.stdout.splitlines()[-1] == run.uri
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, CLI_STEPS + 1))
    logged, last = cli_trained.stdout + cli_trained.stderr, records[-1]
    max_steps = tiny_training(corpus.data, corpus.root)["max_steps"]
    assert f"step {CLI_STEPS}/{max_steps} loss {last['loss']:.4f} " in logged, logged[-3000:]
    assert f"run {run.uri} at step {CLI_STEPS}" in logged

    # No server named: the run is on the one serve recorded under --data, not on a temporary one.
    assert TEMPORARY_SERVER_LINE not in cli_trained.stderr
    (recorded,) = runs_named(f"train-{CLI_RUN}")
    assert recorded.state.is_completed() and recorded.parameters["config"]["max_steps_this_run"] == CLI_STEPS


def test_export_hf_writes_a_folder_transformers_loads_with_the_checkpoints_logits(cli_trained, corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.checkpoint import load_model

    run_uri = str(corpus.data / "runs" / CLI_RUN)
    out = tmp_path / "hf"
    # under umask 027 every file of the export is rw-r-----, the weights too (safetensors writes 0600)
    exported = run_cli("export-hf", run_uri, str(out), env=without_prefect(), preexec_fn=lambda: os.umask(0o027))
    assert exported.returncode == 0, exported.stderr
    newest = latest_checkpoint(open_store(run_uri))
    assert exported.stdout.splitlines() == [
        f"exported {open_store(run_uri).url(newest.prefix)} (step {newest.step})", str(out)]
    assert newest.step == CLI_STEPS
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o640)}, modes

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = AutoTokenizer.from_pretrained(out)("def main():\n    return 42", return_tensors="pt")["input_ids"]
    trained, config = load_model(run_uri)
    assert config.name == CLI_RUN
    with torch.no_grad():
        expected = trained.eval()(tokens)
        got = exported(tokens).logits
    assert tokens.shape[1] > 4 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_submit_build_and_train_epoch_find_serves_server_and_complete(cli_trained, corpus, serve):
    submitted = cli("--data", str(corpus.data), "submit-build", str(corpus.build_yaml), "--train-run", CLI_RUN, "--wait")
    progress = waited_lines(submitted)
    build_name = f"build-{corpus.build.name}"
    assert progress[0] == f"waiting for the run to end: {submitted.stdout.split(': ', 1)[1].strip()}"
    assert progress[-1] == f"{build_name}: Completed"
    assert f"{build_name}: Running" in progress
    for stage in ("plan", "ingest", "exact-dedup", "tokenizer", "tokenize", "manifest"):  # a line as each ends
        assert any(re.fullmatch(rf"{build_name} › {stage}-\w+: Completed", line) for line in progress), (stage, progress)
    (line,) = submitted.stdout.splitlines()
    match = re.fullmatch(rf"Completed: {re.escape(serve.api_url.removesuffix('/api'))}/runs/flow-run/([0-9a-f-]+)", line)
    assert match, submitted.stdout
    build_run = flow_run(UUID(match[1]))
    assert build_run.parameters == {"config": corpus.build.model_dump(mode="json"), "train_run": CLI_RUN}
    assert build_run.state.is_completed()

    epoch = cli("--data", str(corpus.data), "train-epoch", CLI_RUN, "--steps", str(EPOCH_STEPS), "--wait")
    progress = waited_lines(epoch)
    assert progress[-1] == f"train-epoch-{CLI_RUN}: Completed" and f"train-{CLI_RUN}: Completed" in progress
    end = CLI_STEPS + EPOCH_STEPS
    segment_done = f"{CLI_RUN}: step {end} of 100000 (this segment: {EPOCH_STEPS}/{EPOCH_STEPS})"
    assert any(line.startswith(segment_done) and line.endswith("segment done (100%)") for line in progress), progress
    match = re.fullmatch(r"Completed: http://\S+/runs/flow-run/([0-9a-f-]+)", epoch.stdout.strip())
    assert match, epoch.stdout
    epoch_run = flow_run(UUID(match[1]))
    assert epoch_run.parameters == {"run": CLI_RUN, "output": str(corpus.data), "steps": EPOCH_STEPS}  # --data's store
    records = read_metrics(open_store(corpus.data).child(f"runs/{CLI_RUN}"))
    assert [r["step"] for r in records] == list(range(1, CLI_STEPS + EPOCH_STEPS + 1))  # continued, not restarted


def waited_lines(done: subprocess.CompletedProcess) -> list[str]:
    """What a command printed on stderr while it waited for its run (without the elapsed times)."""
    lines = done.stderr.splitlines()
    return [lines[0]] + [re.sub(r"^ *\d+s  ", "", line) for line in lines[1:] if re.match(r" *\d+s  ", line)]


def test_serve_stops_on_ctrl_c_and_leaves_the_server_it_attached_to_running(serve, corpus, prefect_server):
    os.killpg(serve.process.pid, signal.SIGINT)
    assert serve.process.wait(timeout=60) == 0, serve.output()[-3000:]
    assert not (corpus.data / SERVED_FILE).exists()
    assert healthy(prefect_server)


def test_serve_with_a_prefect_api_url_that_does_not_answer_says_so(tmp_path):
    done = run_cli("--data", str(tmp_path / "data"), "serve", env=without_prefect(PREFECT_API_URL="http://127.0.0.1:9/api"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip() == (
        "error: PREFECT_API_URL=http://127.0.0.1:9/api does not answer; start that server, or unset PREFECT_API_URL "
        "to have `tinyllama serve` start one"
    )
    assert not (tmp_path / "data" / SERVED_FILE).exists()
