"""``cvm-hostd --libvirt`` against a real libvirt daemon, scraped by a real Prometheus.

The test starts libvirt's own daemons (``virtlogd``, then ``libvirtd`` with a private socket
directory and in a network namespace of its own, so the tap it creates never touches the
host's network), defines a TCG domain from XML (the dev guest's kernel and a busybox
initramfs that idles), starts it, and runs the real ``cvm-hostd`` with ``--libvirt``. A
Debian Prometheus with the deploy/ job shapes must then see the domain's inventory, CPU,
vCPU, block and network series; destroying the domain must turn its ``cvm_vm_state`` to
stopped within one refresh.

libvirt 11.3 comes from bookworm-backports (scripts/install-libvirt.sh): bookworm's 9.0
passes ``-no-acpi`` to QEMU, which QEMU 10 refused. On this machine there is no
``/dev/vhost-net`` and libvirt enables vhost only for KVM domains, so a TCG domain has no
vhost workers: the vhost series are the daemon's own procfs scan of the domain's QEMU pid,
the same code its own VMs use (tests/host_metrics/test_collector.py).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_daemon.devguest.cpio import CpioEntry, newc_archive, with_parent_dirs
from host_daemon.devguest.inputs import find_busybox, find_guest_kernel
from tests.host_metrics.conftest import PROMETHEUS, api, prometheus_config, running_prometheus, wait_for
from workloads.runner import free_port

pytestmark = pytest.mark.slow

VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
INIT = b"#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\nwhile :; do /bin/busybox sleep 1; done\n"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


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
    """virtlogd (unless one answers already) and a private libvirtd; yields the URI."""
    started: list[int] = []
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
        # Its own network namespace: the domain's tap (and anything else libvirt does to the
        # network) stays in there.
        subprocess.run(
            ["unshare", "--net", "libvirtd", "-d", "-f", str(config), "-p", str(base / "libvirtd.pid")],
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


def domain_xml(name: str, files: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
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
      <source file='{files}/disk.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <target dev='cvmt{os.getpid() % 100000}'/>
      <model type='virtio'/>
    </interface>
    <memballoon model='virtio'/>
    <serial type='file'><source path='{files}/console.log'/></serial>
  </devices>
</domain>
"""


@contextlib.contextmanager
def domain_files() -> Iterator[Path]:
    """Kernel, initramfs and disk in a directory QEMU's user (libvirt-qemu) can read."""
    try:
        kernel = find_guest_kernel()
        busybox = find_busybox()
    except Exception as exc:
        _missing(f"no dev guest kernel/busybox: {exc}")
    files = Path(tempfile.mkdtemp(prefix="cvm-libvirt-"))
    try:
        files.chmod(0o755)
        shutil.copyfile(kernel.vmlinuz, files / "vmlinuz")
        entries = [
            CpioEntry.file("bin/busybox", busybox.read_bytes(), 0o755),
            CpioEntry.file("init", INIT, 0o755),
        ]
        (files / "initrd.img").write_bytes(gzip.compress(newc_archive(with_parent_dirs(entries))))
        with open(files / "disk.raw", "wb") as disk:
            disk.truncate(16 * 1024 * 1024)
        for path in files.iterdir():
            path.chmod(0o644)
        yield files
    finally:
        shutil.rmtree(files, ignore_errors=True)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_hostd_follows_a_libvirt_domain_into_prometheus(tmp_path: Path) -> None:
    for tool in ("libvirtd", "virtlogd", "unshare", "qemu-system-x86_64", "prometheus"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed (scripts/install-libvirt.sh)")
    try:
        import libvirt
    except ImportError:
        _missing("libvirt-python is not installed (the libvirt extra)")
    assert PROMETHEUS is not None
    name = f"cvmtest-{os.getpid()}"
    with domain_files() as files, libvirt_daemon(tmp_path / "libvirt") as uri:
        conn = libvirt.open(uri)
        domain = conn.defineXML(domain_xml(name, files))
        hostd: subprocess.Popen[str] | None = None
        try:
            domain.create()
            port = free_port()
            hostd = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "host_daemon.main",
                    "--state-dir",
                    str(tmp_path / "state"),
                    "--listen",
                    f"unix://{tmp_path}/hostd.sock",
                    "--metrics-listen",
                    f"tcp://127.0.0.1:{port}",
                    "--libvirt",
                    uri,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            with running_prometheus(tmp_path, prometheus_config(port)) as (base, process):
                began = time.monotonic()
                info = wait_for(base, f'cvm_vm_info{{vm="{name}", source="libvirt"}}', 90)
                print(f"first cvm_vm_info after {time.monotonic() - began:.1f} s", file=sys.stderr)
                assert info, (process.stderr, hostd.poll())
                assert wait_for(base, f'cvm_vm_block_read_bytes_total{{vm="{name}"}}', 30)
                time.sleep(3)  # a few more scrapes
                query = f'count by (__name__) ({{vm="{name}", __name__=~"cvm_vm_.+"}})'
                names = {
                    s["metric"]["__name__"] for s in api(base, "/api/v1/query", query=query)["data"]["result"]
                }
                running = api(base, "/api/v1/query", query=f'cvm_vm_state{{vm="{name}"}} == 1')
                success = api(base, "/api/v1/query", query=f'cvm_vm_collector_success{{vm="{name}"}}')
                # stopping the domain: its state turns to stopped within one refresh (1 s)
                domain.destroy()
                stopped_at = time.monotonic()
                while f'cvm_vm_state{{state="stopped",vm="{name}"}} 1.0' not in scrape(port):
                    assert time.monotonic() - stopped_at < 5, scrape(port)
                    time.sleep(0.1)
                seen_stopped = time.monotonic() - stopped_at
                stopped = wait_for(base, f'cvm_vm_state{{vm="{name}", state="stopped"}} == 1', 30)
                assert stopped
                after = scrape(port)
        finally:
            if hostd is not None:
                hostd.terminate()
                _, errors = hostd.communicate(timeout=30)
                print(errors[-4000:], file=sys.stderr)
            with contextlib.suppress(libvirt.libvirtError):
                domain.destroy()
            domain.undefine()
            conn.close()
    [series] = info
    labels: dict[str, Any] = series["metric"]
    assert labels["job"] == "cvm-hostd" and labels["tee"] == "none" and labels["machine"].startswith("pc-q35")
    assert labels["qemu_version"].startswith("10.")
    assert {
        "cvm_vm_info",
        "cvm_vm_state",
        "cvm_vm_vcpus",
        "cvm_vm_memory_bytes",
        "cvm_vm_start_time_seconds",
        "cvm_vm_qemu_cpu_seconds_total",  # procfs of the domain's QEMU pid
        "cvm_vm_qemu_resident_memory_bytes",
        "cvm_vm_vcpu_seconds_total",  # libvirt's vcpu.<n>.time
        "cvm_vm_vcpu_delay_seconds_total",
        "cvm_vm_block_read_bytes_total",
        "cvm_vm_block_written_bytes_total",
        "cvm_vm_network_receive_bytes_total",
        "cvm_vm_network_transmit_bytes_total",
        "cvm_vm_balloon_bytes",
        "cvm_vm_kvm_stats_available",  # 0: TCG, told by query-stats-schemas through libvirt
    } <= names, names
    assert "cvm_vm_kvm_exits_total" not in names
    assert [s["metric"]["state"] for s in running["data"]["result"]] == ["running"]
    assert {s["metric"]["collector"]: s["value"][1] for s in success["data"]["result"]} == {
        "procfs": "1",
        "libvirt": "1",
    }
    assert seen_stopped < 5
    # a stopped domain keeps its inventory, loses its process series
    assert 'cvm_vm_info{machine="pc-q35' in after
    assert f'cvm_vm_qemu_cpu_seconds_total{{mode="user",vm="{name}"}}' not in after
    print(
        f"libvirt domain: stopped state seen by the daemon {seen_stopped:.2f} s after destroy",
        file=sys.stderr,
    )
