"""The tap network path: a network namespace per VM, owned by the daemon, with the guest's tap.

A VM whose spec says ``[network] mode = "tap"`` gets the study's benchmark NIC (docs/study.md,
"Benchmark NIC and disk"): virtio-net on a tap device, multi-queue, with vhost-net where
``/dev/vhost-net`` exists. The tap lives in a network namespace that the daemon creates for
that VM at each start and deletes when QEMU exits (and again, idempotently, on ``vm rm`` and
at daemon start):

* **namespace** ``cvm-<tag>-<vm name>`` (:func:`namespace_name`). ``<tag>`` is six hex digits
  of the daemon's state directory: two daemons on one host (tests, CI, a user's and the
  system's) may each have a VM named ``dev``, and neither may delete the other's namespace.
  Network namespace names are file names under ``/run/netns`` (NAME_MAX), so a VM name (at
  most 63 characters) always fits; the tap is inside the namespace, so IFNAMSIZ bounds only
  the tap's name (``tap0``, or the spec's ``ifname``).
* **addresses**: one point-to-point /30, the same in every namespace, :data:`HOST_ADDRESS`
  (``10.213.0.1``, on the tap, inside the namespace) and :data:`GUEST_ADDRESS`
  (``10.213.0.2``, the guest's eth0, told on the dev guest's kernel command line). They are
  private (RFC 1918) and exist only inside the VM's namespace, which has no other interface
  than ``lo`` and the tap and no route out: nothing outside can collide with them, and nothing
  sent to them leaves the namespace. A benchmark client reaches the guest with
  ``ip netns exec <namespace> <client> 10.213.0.2``.
* **tap** ``tap0``, created persistent by ``ip tuntap add ... mode tap`` with ``multi_queue``
  when the NIC has more than one queue: the flag must match what QEMU asks for
  (``IFF_MULTI_QUEUE`` only with ``queues`` > 1, net/tap-linux.c), or TUNSETIFF fails.

How QEMU opens the tap: QEMU runs inside the namespace, ``ip netns exec <namespace>`` in
front of its argv (:func:`exec_prefix`), and opens ``tap0`` by name (``-netdev
tap,ifname=tap0,...``), one ``/dev/net/tun`` file per queue and ``/dev/vhost-net`` per queue
with vhost. The alternative, the daemon opening the tap queues (and vhost-net) in the
namespace and passing the descriptors (``fds=``/``vhostfds=``), would need a thread entering
the namespace with ``setns``, descriptor inheritance through the spawn and would give
nothing that survives a daemon restart. Running QEMU in the namespace changes nothing else
it uses: its QMP socket, pidfile, console log, the vhost-user-vsock back end's socket and 9p
are paths in the file system (``ip netns exec`` keeps the file system; it only remounts
``/sys`` in a private mount namespace), and ``/dev/vhost-vsock`` is a character device whose
CIDs are global, not per network namespace. ``ip netns exec`` execs in place (no fork), so
the spawned pid is QEMU's: the pidfd, the start-time check and reattaching work unchanged.

The pure parts (names, addresses, the ``ip`` argv) are separate from :func:`create` and
:func:`delete`, which run them. Idempotent: :func:`create` deletes a namespace of the same
name first (a stale one from a crash; the VM is not running, so nothing of ours uses it, and
a process still inside an old namespace keeps it alive without holding the name), and
:func:`delete` is quiet when there is nothing to delete.

Needs ``ip`` (iproute2) and root (CAP_NET_ADMIN, CAP_SYS_ADMIN for ``ip netns``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cvmcore.errors import HostNotReady
from host_daemon.accel import open_error
from host_daemon.spec import DEFAULT_TAP_NAME, NAME_RE

NETNS_PREFIX: Final = "cvm-"
PREFIX_LEN: Final = 30
HOST_ADDRESS: Final = "10.213.0.1"
"""The host side of the VM's /30, on the tap inside the VM's namespace."""
GUEST_ADDRESS: Final = "10.213.0.2"
"""The guest's address: its eth0, reachable from (and only from) the VM's namespace."""
NETNS_DIR: Final = Path("/run/netns")
VHOST_NET: Final = Path("/dev/vhost-net")
TUN: Final = Path("/dev/net/tun")
IP_SECONDS: Final = 10.0
MAX_TAP_QUEUES: Final = 256  # MAX_TAP_QUEUES in drivers/net/tun.c

NetPath = Literal["tap+vhost", "tap", "passt", "user", "none"]


@dataclass(frozen=True)
class TapNetwork:
    """Everything about one VM's tap network, from its name and the daemon's state directory."""

    namespace: str
    tap: str = DEFAULT_TAP_NAME
    host_address: str = HOST_ADDRESS
    guest_address: str = GUEST_ADDRESS
    prefix_len: int = PREFIX_LEN

    @property
    def guest_cmdline_ip(self) -> str:
        """The dev guest's ``cvm.ip=ADDR/LEN,GATEWAY`` value."""
        return f"{self.guest_address}/{self.prefix_len},{self.host_address}"


def daemon_tag(state_dir: Path) -> str:
    """Six hex digits naming a daemon (by its state directory) in its namespaces' names."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:6]


def namespace_name(vm_name: str, tag: str) -> str:
    """``cvm-<tag>-<vm name>``: a file name under /run/netns (VM names are at most 63
    characters of ``[a-z0-9_-]``, so the result is always a valid namespace name)."""
    if not NAME_RE.fullmatch(vm_name) or not re.fullmatch(r"[0-9a-f]{6}", tag):
        raise ValueError(f"not a VM name and daemon tag: {vm_name!r}, {tag!r}")
    return f"{NETNS_PREFIX}{tag}-{vm_name}"


def plan(vm_name: str, state_dir: Path, tap: str | None = None) -> TapNetwork:
    """The tap network of VM ``vm_name`` of the daemon with ``state_dir`` (``tap``: the
    spec's ``[network] ifname``, default ``tap0``)."""
    return TapNetwork(namespace=namespace_name(vm_name, daemon_tag(state_dir)), tap=tap or DEFAULT_TAP_NAME)


def create_argvs(net: TapNetwork, queues: int, ip: str = "ip") -> list[list[str]]:
    """The ``ip`` commands that make ``net`` (after any stale namespace is gone)."""
    ns = net.namespace
    tuntap = [ip, "-n", ns, "tuntap", "add", "dev", net.tap, "mode", "tap"]
    if queues > 1:
        tuntap.append("multi_queue")
    return [
        [ip, "netns", "add", ns],
        [ip, "-n", ns, "link", "set", "lo", "up"],
        tuntap,
        [ip, "-n", ns, "addr", "add", f"{net.host_address}/{net.prefix_len}", "dev", net.tap],
        [ip, "-n", ns, "link", "set", net.tap, "up"],
    ]


def delete_argv(namespace: str, ip: str = "ip") -> list[str]:
    return [ip, "netns", "del", namespace]


def exec_prefix(namespace: str, ip: str = "ip") -> list[str]:
    """What goes in front of QEMU's argv to run it inside ``namespace`` (exec in place)."""
    return [ip, "netns", "exec", namespace]


def net_path(mode: str, vhost: bool) -> NetPath:
    """The network path's name, as recorded with runs: tap+vhost, tap, passt, user or none."""
    if mode == "tap":
        return "tap+vhost" if vhost else "tap"
    if mode == "passt":
        return "passt"
    return "user" if mode == "user" else "none"


@dataclass(frozen=True)
class GuestNetwork:
    """What a client needs to reach a VM's guest, read back from its recorded QEMU argv."""

    path: NetPath
    namespace: str = ""  # tap paths: run clients with ``ip netns exec <namespace>``
    guest_address: str = ""  # tap paths: the guest's address inside the namespace
    host_address: str = ""
    queues: int = 0


def network_from_argv(argv: Sequence[str]) -> GuestNetwork:
    """The network of a VM from the argv the daemon recorded for its current or last boot
    (``VM.qemu_argv``): the ``ip netns exec`` prefix names the namespace, ``-netdev`` the path
    (``vhost=on|off``) and queue count."""
    namespace = ""
    if len(argv) > 4 and list(argv[1:3]) == ["netns", "exec"] and Path(argv[0]).name == "ip":
        namespace = argv[3]
    netdev = next((argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-netdev"), None)
    if netdev is None:
        return GuestNetwork("none")
    props = dict(part.partition("=")[::2] for part in netdev.split(",")[1:])
    if netdev.startswith("user"):
        return GuestNetwork("user", queues=1)
    if netdev.startswith("stream"):  # QEMU dials a passt (host_daemon.passt)
        return GuestNetwork("passt", queues=1)
    if not netdev.startswith("tap"):
        return GuestNetwork("none")
    vhost = props.get("vhost") == "on"
    return GuestNetwork(
        net_path("tap", vhost),
        namespace=namespace,
        guest_address=GUEST_ADDRESS if namespace else "",
        host_address=HOST_ADDRESS if namespace else "",
        queues=int(props.get("queues", "1")),
    )


# --------------------------------------------------------------------------------------------
# Running them


def vhost_net_available(path: Path = VHOST_NET) -> bool:
    """Whether QEMU can use in-kernel vhost-net: the device exists and opens read-write."""
    return open_error(path) is None


def _find_ip() -> str | None:
    return shutil.which("ip") or next(
        (str(p) for p in (Path("/usr/sbin/ip"), Path("/sbin/ip"), Path("/usr/bin/ip")) if p.exists()), None
    )


def can_make_tap() -> bool:
    """Whether this process could make a VM's tap network: root, ``/dev/net/tun``, iproute2."""
    return os.geteuid() == 0 and TUN.exists() and _find_ip() is not None


def ip_binary() -> str:
    found = _find_ip()
    if found is None:
        raise HostNotReady(
            '[network] mode = "tap" needs the ip command (Debian package iproute2): apt-get install iproute2'
        )
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=IP_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostNotReady(f"{' '.join(argv)}: {exc}") from exc


def exists(namespace: str) -> bool:
    return (NETNS_DIR / namespace).exists()


def delete(namespace: str, ip: str | None = None) -> bool:
    """Delete ``namespace`` (its tap goes with it); whether there was one. Blocking."""
    if not exists(namespace):
        return False
    result = _run(delete_argv(namespace, ip or ip_binary()))
    if result.returncode != 0 and exists(namespace):
        raise HostNotReady(f"cannot delete network namespace {namespace}: {result.stderr.strip()}")
    return True


def create(net: TapNetwork, queues: int) -> float:
    """Make ``net`` afresh (a stale namespace of the same name is deleted first); the seconds
    it took. Blocking. On failure nothing is left and :class:`HostNotReady` says why."""
    started = time.monotonic()
    ip = ip_binary()
    delete(net.namespace, ip)
    for argv in create_argvs(net, queues, ip):
        result = _run(argv)
        if result.returncode != 0:
            detail = result.stderr.strip() or f"exit status {result.returncode}"
            with contextlib.suppress(HostNotReady):
                delete(net.namespace, ip)
            hint = " (the tap network needs root: CAP_NET_ADMIN)" if "ermission" in detail else ""
            raise HostNotReady(f"tap network: {' '.join(argv[1:])}: {detail}{hint}")
    return time.monotonic() - started


def owned(state_dir: Path, names: Iterable[str] | None = None) -> list[str]:
    """This daemon's namespaces that exist now (by the tag of ``state_dir``)."""
    prefix = f"{NETNS_PREFIX}{daemon_tag(state_dir)}-"
    if names is None:
        try:
            names = [p.name for p in NETNS_DIR.iterdir()]
        except OSError:
            return []
    return sorted(n for n in names if n.startswith(prefix))


def remove_stale(state_dir: Path, running: Iterable[str]) -> list[str]:
    """At daemon start: delete this daemon's namespaces whose VM is not among ``running``."""
    keep = {plan(name, state_dir).namespace for name in running}
    removed = []
    for namespace in owned(state_dir):
        if namespace not in keep:
            try:
                if delete(namespace):
                    removed.append(namespace)
            except HostNotReady:
                continue
    return removed
