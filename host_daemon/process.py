"""Processes the daemon starts and follows: QEMU and its helpers.

QEMU is started with ``posix_spawn`` in a new session (``setsid``), so neither a signal to
the daemon's process group nor the daemon's death reaches it: VMs outlive a daemon
restart. The daemon follows each process through a pidfd (Linux >= 5.3), which becomes
readable when the process exits, whether or not it is the daemon's child. For its own
children ``waitid(P_PIDFD)`` then yields the exit status; a process inherited from a
previous daemon can be watched but not reaped, so its status is unknown.

A pid alone does not identify a process across a daemon restart (pids are reused), so
each record keeps the process start time, field 22 of ``/proc/<pid>/stat``, in clock
ticks since boot (proc(5)).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from host_daemon.metrics.parse import parse_stat


def process_start_ticks(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it does not exist."""
    try:
        return parse_stat((proc / str(pid) / "stat").read_text()).start_ticks
    except (OSError, ValueError):
        return None


def same_process(pid: int, start_ticks: int, proc: Path = Path("/proc")) -> bool:
    return pid > 0 and start_ticks > 0 and process_start_ticks(pid, proc) == start_ticks


def process_thread_ids(pid: int, proc: Path = Path("/proc")) -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir(proc / str(pid) / "task"))
    except OSError:
        return []


@dataclass
class Spawned:
    pid: int
    start_ticks: int
    pidfd: int
    child: bool  # spawned by this daemon (can be reaped, exit status known)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def spawn(argv: Sequence[str], log_path: Path, *, cwd: Path | None = None) -> Spawned:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``."""
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    env = dict(os.environ)
    if cwd is not None:
        # posix_spawn has no cwd action before Python 3.13; QEMU needs none (all paths are absolute).
        env["PWD"] = str(cwd)
    pid = os.posix_spawnp(argv[0], list(argv), env, file_actions=file_actions, setsid=True)
    pidfd = os.pidfd_open(pid)
    return Spawned(pid, process_start_ticks(pid) or 0, pidfd, child=True)


def adopt(pid: int, start_ticks: int) -> Spawned | None:
    """Follow a process a previous daemon started, if it is still the same process."""
    if not same_process(pid, start_ticks):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if not same_process(pid, start_ticks):  # it exited and the pid was reused in between
        os.close(pidfd)
        return None
    return Spawned(pid, start_ticks, pidfd, child=False)


async def wait_exit(process: Spawned) -> int | None:
    """Wait until ``process`` exits; its status (negative: killed by that signal) or None.

    None means the status cannot be known: the process was not this daemon's child.
    """
    await trio.lowlevel.wait_readable(process.pidfd)
    if not process.child:
        return None
    try:
        # The pidfd is readable: the process has exited and waitid returns at once.
        result = os.waitid(os.P_PIDFD, process.pidfd, os.WEXITED)  # noqa: ASYNC222
    except ChildProcessError:
        return None
    if result is None:
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


def send_signal(process: Spawned, signum: signal.Signals) -> bool:
    """Signal ``process`` through its pidfd (never a reused pid); False when it is gone.

    Gone includes a pidfd already closed: the exit task closes it when QEMU ends, and a
    KillVM that arrives while that task finishes up must not signal a closed descriptor.
    """
    if process.pidfd < 0:
        return False
    try:
        signal.pidfd_send_signal(process.pidfd, signum)
    except ProcessLookupError:
        return False
    return True


async def kill_and_reap(process: Spawned, seconds: float = 5.0) -> None:
    """SIGKILL ``process``, collect its exit status when it is this daemon's child, close it.

    A child that is killed but never waited for stays a zombie for the daemon's whole life
    (one per VM start for vhost-device-vsock, before this); SIGKILL ends a process within
    ``seconds`` unless it is stuck in the kernel, and then the daemon moves on.
    """
    send_signal(process, signal.SIGKILL)
    with trio.move_on_after(seconds):
        await wait_exit(process)
    process.close()


def kill_pid_if_same(pid: int, start_ticks: int, signum: signal.Signals = signal.SIGKILL) -> None:
    """Kill a helper recorded by pid and start time, unless the pid now names another process."""
    process = adopt(pid, start_ticks)
    if process is None:
        return
    try:
        send_signal(process, signum)
    finally:
        process.close()
