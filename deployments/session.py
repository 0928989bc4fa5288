"""How a CLI command runs flows in its own process, and how it ends.

    with flow_session(data_dir, api_url) as session:
        manifest_uri = session.run(build_dataset, config)

- Its runs are recorded on the server the user runs, else on a temporary one
  (deployments/serve.py `server_for_command`).
- Nothing outlives it: the command is a child subreaper (orphaned grandchildren, such as Ray's
  agents, are re-parented to it and stopped at the end) and a guardian process stops its whole
  tree if it dies, even by SIGKILL (runtime/processes.py).
- Ctrl-C or SIGTERM stops the work (the flow's tasks, Ray, training processes), marks its
  Prefect runs Cancelled (the flow run, its task runs and subflow runs), and exits 130 with a
  one-line message. Whatever was half-written is redone by the next run (receipts, COMMIT markers).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from datetime import datetime, timezone
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from deployments.errors import Interrupted, debug_enabled
from deployments.serve import server_for_command
from deployments.terminal import progress_bars
from flows.cancellation import cancel_runs
from runtime.processes import become_subreaper, guard_process_tree, stop_descendants

CLEANUP_GRACE_S = 5.0
REINTERRUPT_S = 3.0  # an interrupt not yet seen by the clean-up is raised again this often
INTERRUPTED = "Cancelled by an interrupt of the command line (Ctrl-C or SIGTERM)"
FAILURE_RESTATED = ("Encountered exception during execution:", "Finished in state Failed(")  # Prefect's engine


_interrupted_at: list[datetime] = []  # when this command was first interrupted


def _interrupt(signum, frame) -> None:
    """Ctrl-C or SIGTERM: raise KeyboardInterrupt, and again every REINTERRUPT_S while none is
    being handled, until the clean-up takes over. Raised inside Ray's C code, an interrupt can be
    swallowed there ("Exception ignored in ..."), and the command would carry on as if never
    interrupted; one being handled (a task stopping torchrun, say) is left to finish."""
    if not _interrupted_at:
        _interrupted_at.append(datetime.now(timezone.utc))
    signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, REINTERRUPT_S, REINTERRUPT_S)
    if _deferring or (signum == signal.SIGALRM and _handling_an_interrupt()):
        return
    raise KeyboardInterrupt


_deferring: list[bool] = []  # inside _interrupts_deferred


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """An interrupt inside is raised on the way out, once what was made inside is known (a flow
    run created on the server, say)."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _interrupted_at:
        raise KeyboardInterrupt


def _handling_an_interrupt() -> bool:
    error = sys.exc_info()[1]
    while error is not None:
        if _is_interrupt(error):
            return True
        error = error.__context__
    return False


def _ignore_interrupts() -> None:
    """For the clean-up, which is short: let it finish."""
    signal.setitimer(signal.ITIMER_REAL, 0)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(signum, signal.SIG_IGN)


class FlowSession:
    def __init__(self) -> None:
        self.flow_runs: list[UUID] = []  # the runs of the flows this command called
        self.ui_url: str | None = None  # the Prefect UI that shows them (None: a temporary server's)

    def run(self, flow, *args: Any, **kwargs: Any) -> Any:
        """Call `flow` here, as `flow(*args, **kwargs)` does, on a flow run this session creates and
        remembers first (for the progress bars, and so that an interrupt cancels it): an interrupt at
        any moment after finds it. (Remembered once Running, as before, an interrupt between the
        engine's creating the run and its Running hook, a window of seconds on a loaded machine, found
        no run to cancel: the run ended Crashed, or stayed Running where the engine's own report of
        the crash did not reach a busy server.)"""
        from prefect.client.orchestration import get_client
        from prefect.context import TagsContext
        from prefect.flow_engine import run_flow
        from prefect.states import Pending
        from prefect.utilities.callables import get_call_parameters

        parameters = get_call_parameters(flow.fn, args, kwargs)
        with _interrupts_deferred(), get_client(sync_client=True) as client:
            flow_run = client.create_flow_run(
                flow, parameters=flow.serialize_parameters(parameters), state=Pending(),
                tags=TagsContext.get().current_tags,
            )
            self.flow_runs.append(flow_run.id)
        with progress_bars(self.flow_runs):
            return run_flow(flow, flow_run=flow_run, parameters=parameters)


@contextlib.contextmanager
def flow_session(data_dir: Path, api_url: str | None = None) -> Iterator[FlowSession]:
    """See the module docstring; raises Interrupted after an interrupt has been cleaned up."""
    become_subreaper()
    guard_process_tree()
    _interrupted_at.clear()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # Prefect's own handler inside flow runs
    signal.signal(signal.SIGINT, _interrupt)
    session = FlowSession()
    try:
        with server_for_command(data_dir, api_url) as server:
            session.ui_url = server.ui_url
            _quiet_console(tracebacks=debug_enabled(), run_links=server.ui_url is not None)
            try:
                yield session
            except BaseException as error:
                # after an interrupt, whatever the work raised is its consequence: Prefect's engine,
                # interrupted between two tasks, can fail the flow with an error of its own
                if not (_is_interrupt(error) or _interrupted_at):
                    raise
                _ignore_interrupts()
                # the runs' states first: they are what is left to see if the command is killed while
                # Ray stops (seconds on a loaded machine)
                cancelled = cancel_runs(session.flow_runs, INTERRUPTED, failed_since=_interrupted_at[0] if _interrupted_at else None)
                _stop_work()
                raise Interrupted(f"interrupted: the work stopped; {cancelled} Prefect run(s) marked Cancelled "
                                  f"on {server.api_url} (a rerun redoes only what was not finished)") from None
    finally:
        _ignore_interrupts()
        _stop_work()
        stop_descendants(grace_s=CLEANUP_GRACE_S)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


class _QuietConsole(logging.Formatter):
    """A console formatter that leaves out tracebacks and the engine's restatements of a run's
    failure ("Encountered exception during execution: X", "Finished in state Failed(... X)"): the
    CLI ends with one line saying what failed, where X was printed four times; the run's logs in
    the UI and --debug keep them. With a temporary server, the engine's "View at <url>" lines go
    too: that server stops with the command (the summary says how to see the runs)."""

    def __init__(self, inner: logging.Formatter | None, tracebacks: bool, run_links: bool):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.tracebacks, self.run_links = tracebacks, run_links

    def format(self, record: logging.LogRecord) -> str:
        if not self.tracebacks:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(record)

    def shown(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(FAILURE_RESTATED):
            return self.tracebacks
        return self.run_links or not message.startswith("View at ")


def _quiet_console(tracebacks: bool, run_links: bool) -> None:
    import prefect.main  # noqa: F401  (sets up Prefect's logging, console handler included)
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for handler in {h for logger in loggers for h in getattr(logger, "handlers", [])}:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _QuietConsole):
            quiet = _QuietConsole(handler.formatter, tracebacks, run_links)
            handler.setFormatter(quiet)
            handler.addFilter(quiet.shown)


def _is_interrupt(error: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(error, (KeyboardInterrupt, TerminationSignal)) or (
        type(error).__name__ == "Abort" and isinstance(error.__cause__, KeyboardInterrupt)
    )


def _stop_work() -> None:
    """Stop Ray (its workers run the stage's shards) if this process started it; training processes
    were stopped by their launcher on the way out."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
