"""A private libvirt daemon and small TCG domains, for the libvirt provider's tests and benchmark.

:func:`libvirt_daemon` starts ``virtlogd`` (unless one answers already) and a ``libvirtd``
with its own socket directory, network namespace and mount namespace; :func:`domain_files`
and :func:`domain_xml` make a domain that boots the dev guest's kernel into a busybox that
idles. libvirt 11.3 comes from bookworm-backports (scripts/install-libvirt.sh): bookworm's
9.0 passes ``-no-acpi`` to QEMU, which QEMU 10 refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_daemon.devguest import ImageError
from host_daemon.devguest.cpio import CpioEntry, newc_archive, with_parent_dirs
from host_daemon.devguest.inputs import find_busybox, find_guest_kernel

LOCK_FILE = Path(tempfile.gettempdir()) / "cvmctl-tests-libvirt.lock"
TOOLS = ("libvirtd", "virtlogd", "unshare", "qemu-system-x86_64")


def missing(what: str) -> None:
    """A test's prerequisite is missing: skipped here, a failure in CI (where setup installs it)."""
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


def require_libvirt(*tools: str) -> Any:
    """The libvirt module, once libvirt's tools, ``tools`` and the dev guest's kernel are there."""
    for tool in (*TOOLS, *tools):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (scripts/setup.sh, scripts/install-libvirt.sh)")
    try:
        find_guest_kernel(), find_busybox()
    except ImageError as exc:
        missing(f"no dev guest kernel/busybox: {exc}")
    try:
        import libvirt
    except ImportError:
        missing("libvirt-python is not installed (the libvirt extra)")
    return libvirt


VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
INIT = b"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\nwhile :; do /bin/busybox sleep 1; done\n"


def _pid_of(pidfile: Path, seconds: float = 20.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return int(pidfile.read_text().strip())
        time.sleep(0.1)
    raise AssertionError(f"{pidfile} did not appear")


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def libvirt_daemon(base: Path) -> Iterator[str]:
    """virtlogd (unless one answers already) and a private libvirtd; yields the URI.

    One at a time on the machine (a lock file): libvirtd's QEMU driver still shares
    ``/run/libvirt/qemu`` with any other libvirtd, and the virtlogd one run started is stopped
    when that run ends, so two test runs side by side would trip over each other.
    """
    with _one_at_a_time(), _libvirt_daemon(base) as uri:
        yield uri


@contextlib.contextmanager
def _one_at_a_time(wait: float = 1200.0) -> Iterator[None]:
    # O_RDONLY: root may not open for writing a file another user made in sticky /tmp.
    fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test run has held {LOCK_FILE} for {wait:g} s")
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _libvirt_daemon(base: Path) -> Iterator[str]:
    started: list[int] = []
    base.mkdir(parents=True, exist_ok=True)
    try:
        if not _socket_answers(VIRTLOGD_SOCKET):
            subprocess.run(["virtlogd", "-d", "-p", str(base / "virtlogd.pid")], check=True, timeout=30)
            started.append(_pid_of(base / "virtlogd.pid"))
        sockets = base / "sock"
        sockets.mkdir(parents=True)
        config = base / "libvirtd.conf"
        config.write_text(
            f'unix_sock_dir = "{sockets}"\nunix_sock_rw_perms = "0700"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{base}/libvirtd.log"\n'
        )
        # QEMU runs as root here: this machine's /dev/kvm is root-only (0600, not group kvm),
        # and a QEMU user that cannot open it makes libvirt call its cached QEMU probe
        # outdated ("KVM was enabled when probing ... but it is not available now") and probe
        # again, about 5 s, on every API call. The qemu.conf saying so is bind-mounted over
        # /etc/libvirt/qemu.conf in libvirtd's own mount namespace; the host's file is untouched.
        qemu_conf = base / "qemu.conf"
        qemu_conf.write_text('user = "root"\ngroup = "root"\n')
        # Its own network namespace too: the domain's tap (and anything else libvirt does to
        # the network) stays in there.
        libvirtd = f"libvirtd -d -f {config} -p {base / 'libvirtd.pid'}"
        subprocess.run(
            [
                "unshare",
                "--net",
                "--mount",
                "sh",
                "-c",
                f"mount --bind {qemu_conf} /etc/libvirt/qemu.conf && exec {libvirtd}",
            ],
            check=True,
            timeout=30,
        )
        started.append(_pid_of(base / "libvirtd.pid"))
        deadline = time.monotonic() + 30
        while not _socket_answers(sockets / "libvirt-sock"):
            assert time.monotonic() < deadline, (base / "libvirtd.log").read_text(errors="replace")
            time.sleep(0.2)
        yield f"qemu:///system?socket={sockets}/libvirt-sock"
    finally:
        for pid in reversed(started):
            _stop(pid)


def domain_xml(name: str, files: Path, *, memory_mib: int = 256) -> str:
    """A TCG domain booting the dev guest's kernel into an idle busybox, with a disk and a tap.

    Each domain gets its own 16 MiB disk (``<name>.raw``, made here) and console log in
    ``files``: QEMU locks its disk images and libvirt its log files.
    """
    disk = files / f"{name}.raw"
    with open(disk, "wb") as image:
        image.truncate(16 * 1024 * 1024)
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{files}/vmlinuz</kernel>
    <initrd>{files}/initrd.img</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <target dev='cvmt{abs(hash(name)) % 10**10}'/>
      <model type='virtio'/>
    </interface>
    <memballoon model='virtio'/>
    <serial type='file'><source path='{files}/{name}.console.log'/></serial>
  </devices>
</domain>
"""


@contextlib.contextmanager
def domain_files() -> Iterator[Path]:
    """The kernel and initramfs, in a directory any QEMU user can read (domain_xml adds disks)."""
    kernel = find_guest_kernel()  # ImageError without the dev guest's inputs
    busybox = find_busybox()
    files = Path(tempfile.mkdtemp(prefix="cvm-libvirt-"))
    try:
        files.chmod(0o755)
        shutil.copyfile(kernel.vmlinuz, files / "vmlinuz")
        entries = [
            CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755),
            CpioEntry.file("init", INIT, 0o755),
        ]
        (files / "initrd.img").write_bytes(gzip.compress(newc_archive(with_parent_dirs(entries))))
        for path in files.iterdir():
            path.chmod(0o644)
        yield files
    finally:
        shutil.rmtree(files, ignore_errors=True)
