"""`tinyllama serve`: a Prefect server, the deployments, and the process that runs them.

- With PREFECT_API_URL set, attach to that server (it must answer); otherwise attach to a
  Prefect server already answering at host:port, or start one there:
  `prefect server start` as a subprocess, database in PREFECT_HOME (./data/prefect/prefect.db,
  SQLite) unless PREFECT_SERVER_DATABASE_CONNECTION_URL names another (PostgreSQL:
  postgresql+asyncpg://user:password@host:5432/db), analytics off, log in PREFECT_HOME/server.log.
- Register the deployments (deployments/deploy.py) and serve them: each flow run is a
  subprocess of this process. The server's address is recorded in <data>/prefect/serve.json
  meanwhile, so the CLI's other commands record their runs there too (`server_for_command`).
- Ctrl-C or SIGTERM stops, in this order: the runner; the flow runs still going (SIGTERM, so
  that they report their end to the server); anything they left behind (this process is a
  child subreaper, so orphaned grandchildren such as a run's Ray workers are re-parented to
  it and found); last the server this process started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from deployments.settings import configure_prefect
from runtime.processes import become_subreaper, die_with_parent, stop_descendants, stop_process_tree

STARTUP_TIMEOUT_S = 180.0
DEFAULT_API_URL = "http://127.0.0.1:4200/api"
SERVED_FILE = "prefect/serve.json"  # under the data folder: the API URL of the server `tinyllama serve` uses  # a first start on a fresh database takes ~30 s on a small machine


class ServeError(RuntimeError):
    """The Prefect server could not be reached or started; the message says why."""


def healthy(api_url: str, timeout_s: float = 15.0) -> bool:
    """Whether a Prefect API answers its health check at `api_url` (…/api). No server there is
    known at once (connection refused); a busy one may take seconds on a loaded machine (2 s was
    too short at a load of ~6, and a command refused a server that was up)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


class PrefectServer:
    """`prefect server start` on host:port as a child process, with its output in `log_path`."""

    def __init__(self, host: str, port: int, log_path: Path, ui: bool = True):
        self.host, self.port, self.log_path, self.ui = host, port, log_path, ui
        self.api_url = f"http://{host}:{port}/api"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        prefect = Path(sys.executable).with_name("prefect")
        command = [str(prefect), "server", "start", "--host", self.host, "--port", str(self.port), "--analytics-off"]
        env = {
            **os.environ,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The UI asks the API at these (the --host/--port flags alone leave it at the default 4200).
            "PREFECT_SERVER_API_HOST": self.host,
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_UI_ENABLED": "true" if self.ui else "false",
        }
        env.pop("PREFECT_API_URL", None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches serve, which stops the server last
                preexec_fn=die_with_parent,  # SIGTERM if this process dies, even by SIGKILL
            )
        deadline = time.monotonic() + timeout_s
        while not healthy(self.api_url):
            if self.process.poll() is not None:
                raise ServeError(f"the Prefect server exited with code {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"the Prefect server did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        stop_process_tree(process)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def prefect_api(host: str = "127.0.0.1", port: int = 4200) -> Iterator[tuple[str, PrefectServer | None]]:
    """The API URL of a Prefect server to use, and the server if this process started it:
    PREFECT_API_URL's, one already at host:port, or one started there (stopped on exit).
    This process's Prefect client, and its subprocesses, point at it meanwhile."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    server = None
    with contextlib.ExitStack() as stack:
        api_url = os.environ.get("PREFECT_API_URL")
        if api_url:
            if not healthy(api_url):
                raise ServeError(
                    f"PREFECT_API_URL={api_url} does not answer; start that server, or unset PREFECT_API_URL "
                    "to have `tinyllama serve` start one"
                )
            print(f"attaching to the Prefect server at {api_url}", flush=True)
        elif healthy(api_url := f"http://{host}:{port}/api"):
            print(f"attaching to the Prefect server already running at {api_url}", flush=True)
        else:
            server = PrefectServer(host, port, Path(PREFECT_HOME.value()) / "server.log")
            database = "PostgreSQL" if os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") else "SQLite"
            print(f"starting a Prefect server on {host}:{port} ({database}; log: {server.log_path})", flush=True)
            stack.callback(server.stop)
            server.start()
        stack.enter_context(_environment("PREFECT_API_URL", api_url))
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        yield api_url, server


@contextlib.contextmanager
def running_server(data_dir: Path, api_url: str | None = None) -> Iterator[str]:
    """The API of the server `tinyllama serve` uses (`api_url` or PREFECT_API_URL, else the one
    recorded under `data_dir`), for commands that submit runs to it; a clear error if none answers."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = api_url or os.environ.get("PREFECT_API_URL") or served_api_url(data_dir) or DEFAULT_API_URL
    if not healthy(api_url):
        raise ServeError(f"no Prefect server answers at {api_url}: start `tinyllama serve` first (or pass --api-url)")
    with _environment("PREFECT_API_URL", api_url), temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield api_url


class CommandServer(NamedTuple):
    api_url: str
    ui_url: str | None  # where the runs show; None on a temporary server (no UI, gone with the command)


@contextlib.contextmanager
def server_for_command(data_dir: Path, api_url: str | None = None) -> Iterator[CommandServer]:
    """The Prefect server a CLI command records its runs on, so that they show in the UI the user
    has open: `api_url` (--api-url or PREFECT_API_URL; it must answer), else the one `tinyllama
    serve` runs for `data_dir` (its address recorded there), else a temporary one on a free port,
    without the UI, stopped when the command ends. Temporary or not, a terminal's Ctrl-C does not
    reach the server (a session of its own): the command reports its runs' end before it exits."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with contextlib.ExitStack() as stack:
        temporary = False
        api_url = api_url or os.environ.get("PREFECT_API_URL")
        if api_url:
            if not healthy(api_url):
                raise ServeError(f"no Prefect server answers at {api_url} (--api-url / PREFECT_API_URL)")
        elif not (api_url := served_api_url(data_dir)):
            server = PrefectServer("127.0.0.1", free_port(), Path(PREFECT_HOME.value()) / "temporary-server.log", ui=False)
            print(
                f"starting a temporary Prefect server (`tinyllama serve` keeps one, with the UI; log: {server.log_path})",
                file=sys.stderr, flush=True,
            )
            stack.callback(server.stop)
            server.start()
            api_url, temporary = server.api_url, True
        stack.callback(_drain_prefect_workers)  # before the server stops: else they wait for it at exit
        stack.enter_context(_environment("PREFECT_API_URL", api_url))
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
        yield CommandServer(api_url, None if temporary else ui_url(api_url))


def _drain_prefect_workers(timeout_s: float = 30) -> None:
    """Send the events and logs this process still holds to the server."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout_s)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def served_api_url(data_dir: Path) -> str | None:
    """The API URL that `tinyllama serve` recorded under `data_dir`, if its server answers."""
    try:
        api_url = json.loads((Path(data_dir) / SERVED_FILE).read_text())["api_url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return api_url if healthy(api_url) else None


@contextlib.contextmanager
def _recorded_address(data_dir: Path, api_url: str) -> Iterator[None]:
    """Record `api_url` under `data_dir` while serve runs, for the CLI's other commands to find."""
    record = Path(data_dir) / SERVED_FILE
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"api_url": api_url, "pid": os.getpid()}))
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _sigint_as_sigterm(signum, frame) -> None:
    # Prefect's runner stops gracefully on SIGTERM (it cancels the runs in flight, so they end
    # Cancelled in the UI); on a plain KeyboardInterrupt it would leave them Running.
    os.kill(os.getpid(), signal.SIGTERM)


def serve_main(
    host: str = "127.0.0.1",
    port: int = 4200,
    data_dir: Path = Path("data"),
    build_config: Path | None = None,
    train_config: Path | None = None,
    epoch_schedule_active: bool = False,
    train_after_build: bool = True,
) -> None:
    """Serve the deployments until Ctrl-C / SIGTERM; see the module docstring.

    The deployments' default parameters come from `build_config` (a build YAML; default: the
    sample corpus under data_dir/raw, made if missing, built into data_dir) and `train_config`
    (a run YAML without `data`; default: deploy.sample_training). `epoch_schedule_active`
    starts the hourly train-epoch schedule switched on; `train_after_build` enables the
    automation that trains on every finished build-dataset deployment run.
    """
    configure_prefect(data_dir)
    become_subreaper()
    handlers = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # until the runner installs its own
    signal.signal(signal.SIGINT, _sigint_as_sigterm)
    try:
        with prefect_api(host, port) as (api_url, server), _recorded_address(data_dir, api_url):
            try:
                _serve(data_dir, build_config, train_config, epoch_schedule_active, train_after_build, api_url)
            finally:
                print("stopping: the runs in flight, then the Prefect server", flush=True)
                for signum in handlers:  # the clean-up is bounded (about 30 s at most): let it finish
                    signal.signal(signum, signal.SIG_IGN)
                stop_descendants(spare=server.pid if server else None)  # the runs still reach the server
    except KeyboardInterrupt:
        pass
    finally:
        for signum in handlers:
            signal.signal(signum, signal.SIG_IGN)
        stop_descendants()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _serve(
    data_dir: Path,
    build_config: Path | None,
    train_config: Path | None,
    epoch_schedule_active: bool,
    train_after_build: bool,
    api_url: str,
) -> None:
    from prefect import serve

    from deployments.deploy import deployments, sample_training
    from flows.pretrain import TrainSettings
    from tasks.config import BuildConfig

    if build_config:
        build = BuildConfig.from_yaml(build_config)
    else:
        build = BuildConfig.from_yaml(sample_build_config(data_dir)).model_copy(update={"output": str(data_dir.resolve())})
    train = TrainSettings.from_yaml(train_config) if train_config else sample_training(data_dir)
    declared = deployments(
        build,
        train,
        epoch_schedule_active=epoch_schedule_active or epoch_schedule_was_active(),
        train_after_build=train_after_build,
    )
    print(f"Prefect UI: {ui_url(api_url)}  (Ctrl-C stops everything started here)", flush=True)
    serve(*declared)


def epoch_schedule_was_active() -> bool:
    """Whether the train-epoch schedule was switched on (in the UI, say) before this start, so
    that registering the deployments again keeps it on."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.deploy import TRAIN_EPOCH

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(TRAIN_EPOCH)
        except ObjectNotFound:
            return False
    return any(schedule.active for schedule in deployment.schedules)


def sample_build_config(data_dir: Path) -> Path:
    """The sample corpus's build config under data_dir/raw (making the corpus if it is not there)."""
    from demo.sample_corpus import make_sample_corpus

    config = data_dir / "raw" / "sample.yaml"
    if not config.exists():
        make_sample_corpus(config.parent)
    return config
