"""Process lifecycle: trees from /proc, binding to a parent's death, the guardian."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from runtime.processes import parent_pid, process_alive, process_start, process_tree

# A parent that guards its tree, then starts a child that starts a grandchild in a session of
# its own (as Ray starts its agents): after the parent's SIGKILL no one would stop them.
_GUARDED_PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from runtime.processes import guard_process_tree
    guard_process_tree()
    grandchild = "import subprocess, time; subprocess.Popen(['sleep', '300'], start_new_session=True); time.sleep(300)"
    subprocess.Popen([sys.executable, "-c", grandchild])
    print("ready", flush=True)
    time.sleep(300)
""")


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_guardian_stops_the_tree_of_a_sigkilled_process():
    parent = subprocess.Popen(
        [sys.executable, "-c", _GUARDED_PARENT], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert parent.stdout.readline().strip() == "ready"
        assert wait_for(lambda: len(process_tree(parent.pid)) >= 3, 10)  # guardian, child, grandchild
        time.sleep(1.5)  # the guardian lists the tree every half second
        tree = process_tree(parent.pid)
        assert all(parent_pid(pid) is not None for pid in tree)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_for(lambda: not any(process_alive(pid) for pid in tree), 10), [
            pid for pid in tree if process_alive(pid)
        ]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_process_is_told_apart_from_a_reused_pid_by_its_start():
    child = subprocess.Popen(["sleep", "300"])
    try:
        started = process_start(child.pid)
        assert started is not None and process_start(child.pid) == started
        assert process_alive(child.pid) and process_alive(child.pid, started)
        assert not process_alive(child.pid, started + 1)  # another process under the same pid
        assert parent_pid(child.pid) == os.getpid() and child.pid in process_tree(os.getpid())
        child.kill()
        assert wait_for(lambda: not process_alive(child.pid), 10)  # a zombie until reaped: not alive
        child.wait()
        assert process_start(child.pid) is None and parent_pid(child.pid) is None
        assert child.pid not in process_tree(os.getpid())
    finally:
        child.kill()
        child.wait()
