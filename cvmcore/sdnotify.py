"""systemd's readiness protocol (sd_notify(3)) without libsystemd.

When a service runs with ``Type=notify``, systemd passes a datagram socket in
``NOTIFY_SOCKET`` (a path, or an abstract name starting with ``@``); the service sends
``READY=1`` once it serves, ``STOPPING=1`` when it begins to stop, ``WATCHDOG=1`` as a
keep-alive and ``STATUS=...`` for ``systemctl status``. Without ``NOTIFY_SOCKET`` every
call is a no-op, so programs call it unconditionally.
"""

from __future__ import annotations

import os
import socket


def notify(*states: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``) to systemd; return whether a message was sent."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
        except OSError:
            return False
    return True


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), in seconds, or None."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
