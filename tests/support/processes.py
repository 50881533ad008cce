"""Whether a process has ended, and the check that a child ends when its parent is killed:
fit workers, ad-hoc workers and watched orphans all promise that."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.support.waiting import wait_for


def ended(pid: int) -> bool:
    """No such process, or a zombie nobody reaps yet (a container's init may not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_ended(pid: int, what: str, timeout: float = 10.0) -> None:
    """Wait until `pid` has ended; AssertionError naming `what` after `timeout` s."""
    wait_for(lambda: ended(pid), timeout=timeout, what=what)


def assert_child_ends_with_parent(command: list[str], what: str,
                                  cwd: Path | None = None) -> None:
    """Run `command`, a parent that prints a child's pid on its first line and then waits;
    kill it as kill -9 or the OOM killer would, and expect the child to end within 5 s. A
    child that outlives the check is killed, so that no test leaves one behind."""
    child = None
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=cwd) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            assert not ended(child), f"{what}: the child had ended before its parent"
            parent.kill()
            parent.wait(10)
            wait_ended(child, what, timeout=5)
        finally:
            parent.kill()
            if child is not None and not ended(child):
                os.kill(child, signal.SIGKILL)
