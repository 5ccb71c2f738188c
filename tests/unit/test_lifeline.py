"""executor/lifeline.py with real processes (no torch, a second or two each): a watched child stops when its parent
dies — by SIGTERM, by SIGKILL after the grace if it ignores that — and at once when its parent died before it could
watch; a hang-up asks a command to stop like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from api.commands.cancel import stop_on_interrupt
from executor import launch, lifeline

REPO_ROOT = Path(__file__).resolve().parents[2]
GONE_S = 5.0


def _child_code(grace_s: float, ignore_sigterm: bool) -> str:
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else ""
    return (
        "import signal, time\nfrom executor import lifeline\n" + ignore + f"lifeline.watch_parent(grace_s={grace_s})\n"
        "print('watching', flush=True)\ntime.sleep(600)\n"
    )


def _start_parent_of_watched_child(tmp_path: Path, grace_s: float, ignore_sigterm: bool) -> tuple[int, int]:
    """A parent process that starts a watched child (naming itself, as a launcher does) and waits; returns both
    pids once the child watches."""
    child_script = tmp_path / "child.py"
    child_script.write_text(_child_code(grace_s, ignore_sigterm))
    parent_code = (
        "import subprocess, sys, os\nfrom executor import lifeline\n"
        f"child = subprocess.Popen([sys.executable, {str(child_script)!r}], env=lifeline.child_env(os.environ),"
        " stdout=subprocess.PIPE, text=True)\n"
        "assert child.stdout.readline() == 'watching\\n'\nprint(child.pid, flush=True)\nchild.wait()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    return parent.pid, int(parent.stdout.readline())


def _seconds_until_gone(pid: int, limit_s: float) -> float:
    started = time.monotonic()
    while launch.pid_alive(pid) and time.monotonic() - started < limit_s:
        time.sleep(0.05)
    assert not launch.pid_alive(pid), f"pid {pid} still runs {limit_s} s after its parent died"
    return time.monotonic() - started


def test_a_watched_child_is_stopped_by_sigterm_when_its_parent_is_killed(tmp_path):
    parent, child = _start_parent_of_watched_child(tmp_path, grace_s=60, ignore_sigterm=False)
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    assert _seconds_until_gone(child, GONE_S) < GONE_S


def test_a_watched_child_that_ignores_sigterm_is_killed_after_its_grace(tmp_path):
    parent, child = _start_parent_of_watched_child(tmp_path, grace_s=1.0, ignore_sigterm=True)
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    assert _seconds_until_gone(child, GONE_S) >= 0.8  # the grace (1 s), less the poll that noticed the death


def test_a_child_whose_named_parent_is_already_gone_stops_at_once(tmp_path):
    """The parent died before the child could watch it (it was importing torch): the pid the launcher wrote in
    the child's environment is not the child's parent, and that is enough."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    script = tmp_path / "child.py"
    script.write_text(_child_code(grace_s=60, ignore_sigterm=False))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), lifeline.PARENT_PID_ENV: str(dead.pid)}
    child = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert child.returncode == -signal.SIGTERM


def test_a_hang_up_asks_a_command_to_stop_like_ctrl_c():
    cancel = threading.Event()
    before = signal.getsignal(signal.SIGHUP)
    with stop_on_interrupt(cancel):
        os.kill(os.getpid(), signal.SIGHUP)
        assert cancel.wait(timeout=5)
    assert signal.getsignal(signal.SIGHUP) == before
