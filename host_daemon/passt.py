"""The rootless network path: passt, a user-mode network back end with real UDP forwarding.

A VM whose spec says ``[network] mode = "passt"`` gets a virtio-net NIC whose back end is a
``passt`` process (https://passt.top, Debian package ``passt``) that the daemon starts for
that VM at each start, beside QEMU, and which ends with it. It is the path for a daemon
without the privileges of the tap path (:mod:`host_daemon.netns` needs CAP_NET_ADMIN and
CAP_SYS_ADMIN): passt needs none.

What passt is (passt(1)): a translation layer between the guest's Layer-2 frames and
ordinary Layer-4 sockets on the host (TCP, UDP and ICMP "ping" sockets). QEMU connects to
passt's unix socket with ``-netdev stream`` (QEMU >= 7.2). Unlike QEMU's user-mode stack
(SLIRP), passt forwards UDP as well as TCP from host ports to guest ports, which is what
the catalogue's iperf-udp needs; like SLIRP, it carries no ICMP echo *from the host to the
guest*: it answers the guest's own echo requests through ping sockets, but nothing on the
host can ping the guest through it. So on this path ping is refused up front with that
reason (cvmctl.vm_target), and runs on the tap path.

How the daemon runs it (passt(1) options):

* ``--foreground``: no daemonizing, so the pid the daemon spawned is passt's, and it is
  recorded, adopted after a daemon restart and killed with QEMU like vhost-device-vsock;
* ``--one-off``: passt quits when its one client (QEMU) disconnects, so a QEMU that dies
  while the daemon is down does not leave passt behind either;
* ``--socket PATH`` in the VM's run directory; no ``--pid`` file, as the daemon knows the
  pid it spawned;
* ``--runas UID:GID``, the daemon's own: started as root, passt otherwise switches to
  ``nobody`` before it binds its socket, which cannot then be made in the daemon's private
  run directory (and Debian 12's build carries on without a socket). Running as the
  daemon's user costs little, because passt confines itself either way: its own user,
  mount, IPC, UTS and PID namespaces, an empty tmpfs as its root, every capability in the
  host's namespaces dropped, and a seccomp filter;
* ``--quiet``: only warnings and errors, into ``passt.log`` beside the socket;
* ``-4`` with ``--address``/``--netmask``/``--gateway``: the guest gets the same IPv4
  configuration as on QEMU's user networking (10.0.2.15/24, gateway 10.0.2.2), so a guest
  image is configured the same way on both rootless paths; the dev guest is told it on its
  kernel command line (it has no DHCP client; passt's DHCP answers the same);
* ``-t ADDR/HOST:GUEST`` and ``-u ADDR/HOST:GUEST`` per forward: the spec's
  ``[[network.forwards]]``, host side bound to a loopback address only (the spec allows no
  other), so nothing beyond this host reaches the guest.

The pure part is :func:`passt_argv`; :func:`start` runs it and waits for the socket.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import trio

from cvmcore.errors import CvmError, HostNotReady
from host_daemon import process as proc
from host_daemon.boottiming import tail_lines
from host_daemon.spec import HostForward

#: The socket passt listens on and QEMU's ``-netdev stream`` connects to, in the run dir.
SOCKET: Final = "passt.sock"
LOG: Final = "passt.log"
SOCKET_WAIT_SECONDS: Final = 10.0

#: The guest's IPv4 configuration on this path: QEMU user networking's (qemu-options.hx,
#: -netdev user: guest 10.0.2.15, gateway 10.0.2.2 in 10.0.2.0/24).
GUEST_ADDRESS: Final = "10.0.2.15"
PREFIX_LEN: Final = 24
GATEWAY: Final = "10.0.2.2"

INSTALL_HINT: Final = '[network] mode = "passt" needs passt (Debian package passt): apt-get install passt'


def passt_argv(
    run_dir: Path, forwards: Iterable[HostForward], runas: tuple[int, int], binary: str = "passt"
) -> list[str]:
    """passt's argv for a VM whose run directory is ``run_dir``, running as ``runas``
    (uid, gid: the daemon's own)."""
    argv = [
        binary,
        "--foreground",
        "--one-off",
        "--quiet",
        "--runas",
        f"{runas[0]}:{runas[1]}",
        "--socket",
        str(run_dir / SOCKET),
        "-4",
        "--address",
        GUEST_ADDRESS,
        "--netmask",
        str(PREFIX_LEN),
        "--gateway",
        GATEWAY,
    ]
    for forward in forwards:
        flag = "-t" if forward.proto == "tcp" else "-u"
        argv += [flag, f"{forward.host_addr}/{forward.host_port}:{forward.guest_port}"]
    return argv


def available() -> bool:
    """Whether passt is installed (the rootless path with UDP can be built here)."""
    return shutil.which("passt") is not None


def passt_binary() -> str:
    """The passt executable, or :class:`HostNotReady` (before QEMU) saying how to get it."""
    found = shutil.which("passt")
    if found is None:
        raise HostNotReady(INSTALL_HINT)
    return found


async def start(run_dir: Path, forwards: Iterable[HostForward]) -> proc.Spawned:
    """Start passt for the VM in ``run_dir`` and wait until its socket exists (QEMU connects
    to it at start and fails if it is not there)."""
    argv = passt_argv(run_dir, forwards, (os.geteuid(), os.getegid()), passt_binary())
    (run_dir / SOCKET).unlink(missing_ok=True)  # a previous boot's
    try:
        helper = proc.spawn(argv, run_dir / LOG)
    except OSError as exc:
        raise HostNotReady(f"cannot start passt: {exc.strerror}; {INSTALL_HINT}") from exc
    socket_path = run_dir / SOCKET
    with trio.move_on_after(SOCKET_WAIT_SECONDS):
        while not socket_path.exists():
            if proc.process_start_ticks(helper.pid) is None:
                break
            await trio.sleep(0.002)
    if not socket_path.exists():
        await proc.kill_and_reap(helper)
        detail = " | ".join(tail_lines(run_dir / LOG, 3))
        raise CvmError(f"passt did not create its socket {socket_path}: {detail}")
    return helper
