"""The `tinyllama` command line as a user runs it: subprocesses on a small sample corpus.

One build of the corpus is shared: the reference of the interrupted build, and the check that a
command uses the server it is pointed at (or the one `tinyllama serve` recorded) and starts none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from demo.sample_corpus import make_sample_corpus
from runtime.processes import process_alive, process_start, process_tree
from tests.builds import build_objects

TEMPORARY_SERVER_LINE = "starting a temporary Prefect server"
COMMANDS = ["make-corpus", "build-dataset", "inspect", "train", "plan-train", "export-hf", "evaluate", "demo", "serve",
            "submit-build", "train-epoch"]
INTERRUPT_DEADLINE_S = 15
LOAD_BURNERS = 4  # CPU-bound processes beside a command: a load of ~6 on 2 cores
ORPHAN_DEADLINE_S = 30  # Ray's workers exit on their own some seconds after their raylet is gone


def cli(*args: str, env: dict | None = None, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, env=env or os.environ,
        timeout=600, **options,
    )


def start_cli(*args: str, env: dict, log: Path) -> subprocess.Popen:
    """The CLI in a session of its own, like a command in a terminal (whose Ctrl-C signals the group)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def without_prefect(**extra: str) -> dict:
    """The environment of a command in a fresh terminal: none of the session's Prefect settings
    (its PREFECT_HOME would put a command's Prefect database outside its --data folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"}
    return {**env, **extra}


def wait_for(predicate, timeout_s: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        assert process is None or process.poll() is None, "the command ended before the moment it was waited for"
        time.sleep(0.2)
    return predicate()


@pytest.fixture(scope="module")
def build_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    corpus = make_sample_corpus(root / "raw", target_bytes=96 << 10, seed=5)
    config = yaml.safe_load(Path(corpus["config"]).read_text())
    config.update(tokenizer={"train": {"vocab_size": 512}}, dedup={"exact": True, "near": False})
    path = root / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(build_yaml, prefect_server, tmp_path_factory) -> str:
    """A completed build, run against the server recorded as `tinyllama serve`'s under the data folder."""
    root = tmp_path_factory.mktemp("reference")
    (root / "data" / "prefect").mkdir(parents=True)
    (root / "data" / "prefect" / "serve.json").write_text(json.dumps({"api_url": prefect_server, "pid": 1}))
    done = cli("--data", str(root / "data"), "build-dataset", str(build_yaml), "--output", str(root / "out"),
               env=without_prefect())
    assert done.returncode == 0, done.stdout + done.stderr
    assert TEMPORARY_SERVER_LINE not in done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith("manifest.json")
    return str(root / "out")


def flow_runs_of(api_url: str, output: str) -> list:
    """The build-dataset flow runs (on `api_url`) that built into `output`."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    os.environ["PREFECT_API_URL"] = api_url
    return [run for run in asyncio.run(read()) if run.parameters.get("config", {}).get("output") == output]


@pytest.mark.slow
def test_a_command_uses_the_given_server_and_ctrl_c_cancels_its_runs(build_yaml, reference, prefect_server, tmp_path):
    out = str(tmp_path / "out")
    env = without_prefect(PREFECT_API_URL=prefect_server)
    process = start_cli("--data", str(tmp_path / "data"), "build-dataset", str(build_yaml), "--output", out,
                        env=env, log=tmp_path / "cli.log")
    receipts = tmp_path / "out" / "datasets" / "sample"
    assert wait_for(lambda: any(receipts.glob("*/receipts/ingest/*")), 300, process), (tmp_path / "cli.log").read_text()
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
    interrupted = time.monotonic()
    process.wait(timeout=60)
    took = time.monotonic() - interrupted
    log = (tmp_path / "cli.log").read_text()
    assert process.returncode == 130, log
    assert took < INTERRUPT_DEADLINE_S, log
    assert log.strip().splitlines()[-1].startswith("interrupted: the work stopped"), log
    assert TEMPORARY_SERVER_LINE not in log  # PREFECT_API_URL's server recorded the run
    assert not any(receipts.glob("*/manifest.json"))
    assert [run.state.name for run in flow_runs_of(prefect_server, out)] == ["Cancelled"]

    rerun = cli("--data", str(tmp_path / "data"), "build-dataset", str(build_yaml), "--output", out, env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert build_objects(out, receipts=False) == build_objects(reference, receipts=False)
    assert sorted(run.state.name for run in flow_runs_of(prefect_server, out)) == ["Cancelled", "Completed"]


@pytest.mark.slow
def commands_of(pids) -> str:
    """The command lines of live processes among `pids`, joined."""
    commands = []
    for pid in pids:
        try:
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        except OSError:
            continue
    return " ".join(commands)


@pytest.mark.slow
def test_ctrl_c_on_a_loaded_machine_the_moment_the_run_appears_leaves_it_cancelled(build_yaml, prefect_server, tmp_path):
    """Issue 26: under a load of ~6 a Ctrl-C ended the command and left its run Running. On a loaded
    machine the engine takes seconds from creating a run to its Running state, where the command
    used to learn of it: a Ctrl-C in between found no run to cancel ("0 Prefect run(s) marked
    Cancelled"; the run ended Crashed, or stayed Running where the engine's own crash report did not
    reach a busy server). The interrupt here lands as soon as the run exists on the server, with CPU
    burners beside the command."""
    out = str(tmp_path / "out")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(LOAD_BURNERS)]
    try:
        process = start_cli("--data", str(tmp_path / "data"), "build-dataset", str(build_yaml), "--output", out,
                            env=without_prefect(PREFECT_API_URL=prefect_server), log=tmp_path / "cli.log")

        def run_appeared() -> list:
            assert process.poll() is None, (tmp_path / "cli.log").read_text()  # it ends only when interrupted
            return flow_runs_of(prefect_server, out)

        assert wait_for(run_appeared, 300), (tmp_path / "cli.log").read_text()
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=300)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    log = (tmp_path / "cli.log").read_text()
    assert process.returncode == 130, log
    assert log.strip().splitlines()[-1].startswith("interrupted: the work stopped"), log
    assert [run.state.name for run in flow_runs_of(prefect_server, out)] == ["Cancelled"], log


def test_a_sigkilled_command_leaves_no_process_behind(build_yaml, tmp_path):
    """No server to use: the command starts a temporary Prefect server, and Ray; SIGKILL (which
    runs no clean-up) must still take them down."""
    process = start_cli("--data", str(tmp_path / "data"), "build-dataset", str(build_yaml), "--output",
                        str(tmp_path / "out"), env=without_prefect(), log=tmp_path / "cli.log")
    try:
        # Ray's workers ("ray::...") run once ray.init has returned and the first stage's tasks are out
        assert wait_for(lambda: "ray::" in commands_of(process_tree(process.pid)), 300, process), (
            (tmp_path / "cli.log").read_text())
        time.sleep(2)  # the guardian lists Ray's processes twice a second
        tree = {pid: process_start(pid) for pid in process_tree(process.pid)}
        commands = commands_of(tree)
        assert "prefect" in commands and "raylet" in commands, commands
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        alive = lambda: [pid for pid, started in tree.items() if process_alive(pid, started)]  # noqa: E731
        assert wait_for(lambda: not alive(), ORPHAN_DEADLINE_S), [
            Path(f"/proc/{pid}/cmdline").read_bytes()[:100] for pid in alive()
        ]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_bad_input_gives_one_line_naming_the_file_and_exit_code_2(build_yaml, tmp_path):
    config = yaml.safe_load(build_yaml.read_text())
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**config, "sources": [{**config["sources"][0], "text_feild": "x"}]}))
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("name: [unclosed\n")
    bad_value = tmp_path / "bad-value.yaml"
    bad_value.write_text(yaml.safe_dump({**config, "shard_tokens": -1}))
    cases = {
        typo: f"error: {typo}: sources.0.text_feild: unknown key (did you mean 'text_field'?)",
        not_yaml: f"error: {not_yaml}: not valid YAML (line 2, column 1)",
        tmp_path / "missing.yaml": f"error: {tmp_path / 'missing.yaml'}: No such file or directory",
        bad_value: f"error: {bad_value}: shard_tokens: Input should be greater than 0",
    }
    for path, message in cases.items():
        # -X importtime lists every module imported: the config is checked before Prefect is loaded.
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "deployments.cli", "build-dataset", str(path)],
            capture_output=True, text=True, env=without_prefect(),
        )
        errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
        assert done.returncode == 2, done.stderr
        assert len(errors) == 1 and errors[0].startswith(message), errors
        assert "prefect" not in done.stderr and "Traceback" not in done.stderr

    debug = cli("--debug", "build-dataset", str(typo), env=without_prefect())
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert cli("build-dataset", env=without_prefect()).returncode == 2  # a usage error: click's message


def test_a_failure_exits_1_with_its_cause_and_submit_needs_a_server(build_yaml, tmp_path):
    done = cli("--data", str(tmp_path / "data"), "submit-build", str(build_yaml), "--api-url", "http://127.0.0.1:9/api",
               env=without_prefect())
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: no Prefect server answers at http://127.0.0.1:9/api: start `tinyllama serve` first (or pass --api-url)"
    )
    assert cli("--version").stdout.startswith("tinyllama ")


def test_a_failure_after_the_config_check_is_said_once(build_yaml, prefect_server, tmp_path):
    config = yaml.safe_load(build_yaml.read_text())
    nothing = tmp_path / "nothing" / "*.jsonl.zst"
    config["sources"][0]["uri"] = str(nothing)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    done = cli("--data", str(tmp_path / "data"), "build-dataset", str(bad), "--output", str(tmp_path / "out"),
               env=without_prefect(PREFECT_API_URL=prefect_server))
    said = f"source {config['sources'][0]['name']!r}: no input matches {nothing}"
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {said}", done.stderr
    assert (done.stdout + done.stderr).count("no input matches") == 1, done.stdout + done.stderr  # not four times


def test_a_store_that_refuses_access_fails_at_once_naming_it(build_yaml, s3_bucket_uri, prefect_server, tmp_path):
    missing = "s3://no-such-bucket-tinyllama/out"
    done = cli("--data", str(tmp_path / "data"), "build-dataset", str(build_yaml), "--output", missing,
               env=without_prefect(PREFECT_API_URL=prefect_server))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot read {missing}/datasets/sample/"
    ) and "the bucket 'no-such-bucket-tinyllama' does not exist" in done.stderr
    assert "Retry 1/" not in done.stdout + done.stderr  # a retry would fail the same way


def test_help_shows_flags_as_flags_and_says_which_server_a_submission_needs():
    helps = {}
    for command in ["", *COMMANDS]:
        done = cli(*([command] if command else []), "--help", env=without_prefect(COLUMNS="200"))
        assert done.returncode == 0, done.stderr
        helps[command] = done.stdout
        assert "<bool>" not in done.stdout, command  # a flag takes no value
    assert re.search(r"│ --debug +Show tracebacks", helps[""]) and re.search(r"│ --data +<path> +Where", helps[""])
    assert re.search(r"│ --wait +Wait for the run to finish", helps["submit-build"])
    assert re.search(r"│ --epochs-on +--no-epochs-on +Start the hourly", helps["serve"])
    for command in ("submit-build", "train-epoch"):  # they need `tinyllama serve`'s server: they start none
        assert "temporary" not in helps[command] and "none is started" in helps[command], helps[command]
        assert "the server `tinyllama serve` runs" in helps[command]
    assert "else a temporary one" in helps["build-dataset"]  # a command that runs its flows here starts one


def test_a_commands_runs_show_in_the_ui_of_the_server_it_was_given(prefect_server, tmp_path):
    """What the demo's summary names (a temporary server has no UI: tests/deployments/test_demo.py)."""
    from deployments.serve import server_for_command

    with server_for_command(tmp_path / "data", prefect_server) as server:
        assert server == (prefect_server, prefect_server.removesuffix("/api"))
