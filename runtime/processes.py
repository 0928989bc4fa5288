"""Process lifecycle, in one place: bind a child to its parent's death, list and stop a process
tree, and a guardian that stops a process's whole tree when that process dies, even by SIGKILL.

Processes are listed with psutil; a process's start time (its identity with the pid) and the
parent-death binding (prctl) are Linux's, absent elsewhere (the project runs its services and
training on Linux).

    subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent)
    stop_process_tree(process)            # SIGTERM its group, SIGKILL what is left after the grace
    guard_process_tree()                  # this process's descendants die with it (a guardian child)

Nothing here knows about Prefect, Ray, torch or the project's other packages: any layer may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

# How long a stopped process (torchrun and its workers, a Prefect server, a flow run) gets
# between SIGTERM and SIGKILL.
STOP_GRACE_S = 15.0
# How often a guardian re-lists the tree it guards.
GUARD_POLL_S = 0.5

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if sys.platform == "linux":
        if ctypes.CDLL(None, use_errno=True).prctl(option, value) != 0:
            raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """The kernel sends `signum` to this process when its parent dies, even by SIGKILL.

    Call it in the child (a Popen preexec_fn, or first thing in a program); it survives exec.
    A parent that died before the call is detected and exits this process at once.
    """
    parent = os.getppid()
    _prctl(_PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os._exit(1)


def become_subreaper() -> None:
    """Orphaned descendants of this process are re-parented to it (not to init), so
    `process_tree(os.getpid())` still finds them."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def parent_pid(pid: int) -> int | None:
    """The parent of `pid`, None once it has exited."""
    try:
        return psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return None


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (with the pid, it tells a reused pid
    apart), None if gone or not on Linux. Not psutil's create_time: that is wall-clock time, which
    moves with NTP, and this identity must compare equal for as long as the process lives."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # after the name in parentheses, which may hold spaces


def process_alive(pid: int, started: int | None = None) -> bool:
    """Whether `pid` is a running process (not a zombie) and, if `started` is given, the same one."""
    try:
        if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
    except psutil.NoSuchProcess:
        return False
    return started is None or process_start(pid) == started


def process_tree(root: int) -> list[int]:
    """The pids of every descendant of `root` (none once it has exited)."""
    try:
        return [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def reap_children() -> None:
    """Collect the exit status of every child of this process that has ended (adopted orphans included)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def stop_processes(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM `pids`, then SIGKILL those still running after `grace_s`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reap_children()
        if not any(process_alive(pid) for pid in pids):
            return
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    reap_children()


def stop_process_tree(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group of `process` (a session leader), then SIGKILL whatever of its tree
    is still alive after `grace_s`.

    The tree is listed first because descendants whose parent died are re-parented and could no
    longer be found from it (torchrun starts each worker in a session of its own, so the group
    signal reaches torchrun only, which then stops its workers).
    """
    tree = set(process_tree(process.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        tree.update(process_tree(process.pid))
    for pid in [process.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def stop_descendants(spare: int | None = None, grace_s: float = STOP_GRACE_S) -> None:
    """Stop this process's children (but `spare` and its tree), then whatever of their trees is left."""

    def others() -> list[int]:
        spared = {spare, *process_tree(spare)} if spare else set()
        return [pid for pid in process_tree(os.getpid()) if pid not in spared]

    children = [pid for pid in others() if parent_pid(pid) == os.getpid()]
    stop_processes(children, grace_s)  # a child ends its own work first (a flow run reports its end)
    stop_processes(others(), grace_s=min(grace_s, 5.0))  # leftovers: orphans re-parented to a subreaper


# --- a guardian: the tree of a process dies with it --------------------------------------------------


def guard_process_tree() -> subprocess.Popen:
    """Start a guardian of this process: when this process dies, however it dies, the guardian stops
    every process of this process's tree it has seen (SIGTERM, SIGKILL after a short grace).

    The guardian re-lists the tree every GUARD_POLL_S seconds and tells processes apart by their
    start time, so a reused pid is never signalled. It runs in a session of its own (a terminal's
    Ctrl-C does not reach it) and exits once the tree it guards is gone.
    """
    return subprocess.Popen(
        [sys.executable, __file__, str(os.getpid())],  # this file alone: it needs psutil and the standard library
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _guard(guarded: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen: dict[int, int] = {}
    while process_alive(guarded):
        for pid in process_tree(guarded):
            if pid != os.getpid() and pid not in seen and (started := process_start(pid)) is not None:
                seen[pid] = started
        time.sleep(GUARD_POLL_S)
    # Orphans of the dead process may have started children of their own since the last listing.
    for pid in list(seen):
        for child in process_tree(pid):
            if child != os.getpid() and (started := process_start(child)) is not None:
                seen.setdefault(child, started)
    left = [pid for pid, started in seen.items() if process_alive(pid, started)]
    stop_processes(left, grace_s=3.0)


if __name__ == "__main__":
    _guard(int(sys.argv[1]))
