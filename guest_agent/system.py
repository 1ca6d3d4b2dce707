"""Facts about the running guest, read from procfs under an injectable root.

Each reader takes ``root`` (``/`` in production, a fixture tree in tests) and returns a
plain value; a missing file gives an empty value rather than an exception, because an
agent must answer GetInfo on any kernel.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from guest_agent.collectors.base import read_kernel_bytes


def _read_text(path: str | Path) -> str:
    try:
        return read_kernel_bytes(path).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def uptime_seconds(root: Path) -> float:
    """Seconds since boot: the first field of /proc/uptime."""
    fields = _read_text(os.path.join(root, "proc/uptime")).split()
    try:
        return float(fields[0]) if fields else 0.0
    except ValueError:
        return 0.0


def hostname(root: Path) -> str:
    name = _read_text(os.path.join(root, "proc/sys/kernel/hostname"))
    return name or (socket.gethostname() if root == Path("/") else "")


@dataclass(frozen=True, slots=True)
class SystemFacts:
    kernel_release: str
    hostname: str
    boot_id: str
    kernel_cmdline: str
    uptime_seconds: float


def read_system_facts(root: Path = Path("/")) -> SystemFacts:
    release = _read_text(root / "proc/sys/kernel/osrelease")
    if root == Path("/"):
        release = release or os.uname().release
    return SystemFacts(
        kernel_release=release,
        hostname=hostname(root),
        boot_id=_read_text(root / "proc/sys/kernel/random/boot_id"),
        kernel_cmdline=_read_text(root / "proc/cmdline"),
        uptime_seconds=uptime_seconds(root),
    )
