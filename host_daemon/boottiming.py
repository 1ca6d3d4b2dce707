"""Boot phases: where a VM's boot time goes, read from the clock and the guest's console.

The study split a boot into QEMU, firmware, kernel and init; the daemon adds its own share
in front and the agent at the end:

    daemon     the StartVM request -> exec of QEMU (spec, image, helpers, argv)
    spawn      exec of QEMU -> QMP ready (greeting and capabilities: devices created)
    firmware   QMP greeting -> the kernel's first console line ("Linux version")
    kernel     -> the init's first marker (``cvm-boot: init-start``, see
                  :mod:`host_daemon.devguest.init`), or in a systemd guest (the Debian
                  image) systemd's first kernel-log line from the real root
                  (``[  2.345678] systemd[1]: systemd 252... running in system mode``,
                  the bracket being the kernel's printk time: the guest's uptime)
    userspace  -> the agent answering the gRPC health check over its channel

Each phase is the difference of two marks on the monotonic clock. A mark that never came
(a guest whose init prints no marker, a daemon restarted mid-boot) leaves the phases that
need it unrecorded rather than guessed, and :meth:`BootClock.unmeasured` says which and why.

The marks are kept with the VM's record: the monotonic clock (``CLOCK_MONOTONIC``) is one
clock for every process on the host, so a daemon restarted during a boot picks the marks up
where the dead one left them (:meth:`BootClock.resume`). What happened while no daemon
watched cannot be timed: an init marker already on the console when the new daemon looks
came at an unknown moment, so the phases that end or start there are marked unmeasured.

Where the kernel starts: the init marker carries the guest's uptime, which the kernel's
clock counts from its own start, so the kernel's start is the marker's arrival minus that
uptime. The console's first kernel line ("Linux version") is only the fallback: on a
virtio console (hvc0, the one confidential guests use) the kernel's early lines come late
or not at all, which would move kernel time into the firmware phase. With neither (an
uptime that disagrees with the host's clock, as a TCG guest's can under load, and no
kernel line), the firmware and kernel phases are left unrecorded rather than guessed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Final

import trio

from host_daemon.devguest.init import BOOT_PHASES, MARKER_PREFIX, parse_boot_marker

PHASES: Final = ("daemon", "spawn", "firmware", "kernel", "userspace")
#: Where each phase starts and ends, by mark name.
PHASE_MARKS: Final = {
    "daemon": ("request", "exec"),
    "spawn": ("exec", "qmp"),
    "firmware": ("qmp", "kernel"),
    "kernel": ("kernel", "init"),
    "userspace": ("init", "agent"),
}
KERNEL_FIRST_LINE: Final = re.compile(r"Linux version \d")
INIT_MARKER: Final = f"{MARKER_PREFIX} {BOOT_PHASES[0]}"
SYSTEMD_START: Final = re.compile(r"\[\s*(\d+\.\d+)\]\s+systemd\[1\]: systemd \d+\S* running in system mode")
CONSOLE_TAIL_LINES: Final = 20
CONSOLE_POLL_SECONDS: Final = 0.01


#: Why phases have no figure after a daemon restart during the boot.
RESTARTED_MID_BOOT: Final = "the daemon was not running when this phase ended"


class BootClock:
    """The marks of one boot and the phases they give."""

    def __init__(self, requested_at: float, spawned_at: float) -> None:
        self.marks: dict[str, float] = {"request": requested_at, "exec": spawned_at}
        self.phases: dict[str, float] = {}
        self.unmeasured: dict[str, str] = {}

    @classmethod
    def resume(
        cls, marks: Mapping[str, float], phases: Mapping[str, float], unmeasured: Mapping[str, str]
    ) -> BootClock:
        """The clock of a boot a previous daemon started, from what it recorded."""
        clock = cls(marks.get("request", 0.0), marks.get("exec", 0.0))
        clock.marks = dict(marks)
        clock.phases = dict(phases)
        clock.unmeasured = dict(unmeasured)
        return clock

    def give_up(self, why: str, *names: str) -> None:
        """Mark the phases ``names`` that have no figure as unmeasured, for ``why``."""
        for name in names:
            if name not in self.phases:
                self.unmeasured.setdefault(name, why)

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks[name] = time.monotonic() if at is None else at

    def kernel_started(self, guest_uptime: float | None) -> bool:
        """Set the kernel mark from the guest's uptime at the init mark; whether it was set.

        Kept from the console when the uptime is missing or would put the kernel's start
        before QMP answered (a guest clock that disagrees with the host's).
        """
        if guest_uptime is None or "init" not in self.marks or "qmp" not in self.marks:
            return False
        start = self.marks["init"] - guest_uptime
        if start <= self.marks["qmp"]:
            return False
        self.marks["kernel"] = start
        return True

    def phase(self, name: str) -> bool:
        """Record phase ``name`` if both its marks exist; whether it was recorded."""
        start, end = PHASE_MARKS[name]
        if start not in self.marks or end not in self.marks:
            return False
        self.phases[name] = round(self.marks[end] - self.marks[start], 6)
        self.unmeasured.pop(name, None)
        return True


def console_has_init_marker(console: Path, max_bytes: int = 8 << 20) -> bool:
    """Whether the guest's init has already printed its first marker on ``console``."""
    try:
        with console.open("rb") as handle:
            return INIT_MARKER.encode() in handle.read(max_bytes)
    except OSError:
        return False


async def console_marks(console: Path) -> AsyncIterator[tuple[str, float | None]]:
    """Yield ("kernel", None) at the kernel's first line, if the console shows it before init,
    and ("init", uptime) at the init's first marker, with the guest uptime it reports (None
    if it has none).

    The console log is a file QEMU appends to; it is polled (inotify would need a thread or
    a C binding, and the poll stops as soon as init speaks).
    """
    seen_kernel = False
    offset = 0
    pending = b""
    while True:
        try:
            with console.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(1 << 20)
        except OSError:
            data = b""
        offset += len(data)
        pending += data
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if not seen_kernel and KERNEL_FIRST_LINE.search(line):
                seen_kernel = True
                yield "kernel", None
            if INIT_MARKER in line:
                marker = parse_boot_marker(line[line.index(INIT_MARKER) :])
                yield "init", marker.uptime if marker is not None else None
                return
            started = SYSTEMD_START.search(line)
            if started is not None:
                yield "init", float(started.group(1))
                return
        await trio.sleep(CONSOLE_POLL_SECONDS)


def tail_lines(path: Path, count: int = CONSOLE_TAIL_LINES, max_bytes: int = 64 * 1024) -> tuple[str, ...]:
    """The last ``count`` non-blank lines of a console log, decoded leniently."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ()
    lines = data.decode("utf-8", "replace").replace("\r", "").splitlines()
    return tuple(line for line in lines if line.strip())[-count:]
