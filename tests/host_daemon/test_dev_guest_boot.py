"""Boot the built-in dev guest for real, under TCG, with hybrid vsock to the agent.

What runs: ``vhost-device-vsock`` (host side of the vsock device: a vhost-user socket for
QEMU and a unix socket for us), then ``qemu-system-x86_64 -accel tcg`` with the dev guest's
kernel and initramfs, the host root over 9p and ``vhost-user-vsock-pci`` (which needs guest
RAM in a shared memfd: ``-object memory-backend-memfd,share=on`` + ``-machine memory-backend=``).
The console (``-serial stdio``) is read line by line and stamped with the host's monotonic
clock, so each ``cvm-boot:`` marker gives two times: the guest's uptime and the host's time
since QEMU was spawned.

The host side of vsock is only ever a unix socket here: this machine's own ``/dev/vsock`` is
its management channel, so no test opens an AF_VSOCK socket on the host. AF_VSOCK is used
inside the guest only (by the agent, or by the stand-in agent below).

Every wait has a deadline (TCG boots in 5.5-9 s here; importing grpc from the venv over 9p
takes ~12 s more), and both processes are killed in teardown whatever happened.

Missing prerequisites (QEMU, the guest kernel, vhost-device-vsock) fail the run in CI
(``CI`` set) and skip elsewhere, naming the script that installs them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
import trio

from host_daemon.devguest import (
    BOOT_PHASES,
    HOST_ROOT_TAG,
    BootMarker,
    DevGuestImage,
    ImageError,
    build_dev_guest,
    dev_guest_cmdline,
    parse_boot_marker,
)

pytestmark = pytest.mark.slow

GUEST_CID = 3
AGENT_PORT = 1024
MEMORY_MIB = 768
BOOT_DEADLINE = 120.0  # QEMU spawn to agent-exec (measured 5.5-9 s; CI may run other tests beside)
AGENT_DEADLINE = 120.0  # agent-exec to the agent answering (the real agent imports grpc over 9p)
POWEROFF_DEADLINE = 60.0


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(what)
    pytest.skip(what)


@pytest.fixture(scope="module")
def dev_guest() -> DevGuestImage:
    for tool, script in (
        ("qemu-system-x86_64", "scripts/install-qemu.sh"),
        ("vhost-device-vsock", "scripts/install-vhost-device-vsock.sh"),
    ):
        if shutil.which(tool) is None:
            _missing(f"{tool} not installed (run {script})")
    try:
        return build_dev_guest()
    except ImageError as exc:
        _missing(str(exc))
        raise  # unreachable: _missing raises


@dataclass
class Console:
    """The console as received: (seconds since QEMU spawn, line), and the markers among it."""

    started: float  # trio.current_time() when QEMU was spawned
    lines: list[tuple[float, str]] = field(default_factory=list)
    markers: list[tuple[float, BootMarker]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)
    closed: bool = False

    def add(self, line: str) -> None:
        t = trio.current_time() - self.started
        self.lines.append((t, line))
        marker = parse_boot_marker(line)
        if marker is not None:
            self.markers.append((t, marker))
        self.changed.set()
        self.changed = trio.Event()

    def close(self) -> None:
        """QEMU closed its stdout: it has exited, nothing more will come."""
        self.closed = True
        self.changed.set()

    def marker(self, phase: str) -> tuple[float, BootMarker] | None:
        return next((m for m in self.markers if m[1].phase == phase), None)

    async def wait_for(self, phase: str, deadline: float) -> tuple[float, BootMarker]:
        with trio.move_on_after(deadline):
            while (found := self.marker(phase)) is None:
                if self.closed or self.marker("fail") or self.marker("poweroff"):
                    break
                await self.changed.wait()
        if found is None:
            pytest.fail(f"no `cvm-boot: {phase}` within {deadline:.0f} s; console tail:\n{self.tail()}")
        return found

    def tail(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


@dataclass
class BootedGuest:
    console: Console
    vsock_path: Path
    qemu: subprocess.Popen[bytes]


async def _read_lines(stream: trio.abc.ReceiveStream, console: Console) -> None:
    buffer = b""
    while chunk := await stream.receive_some(65536):
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            console.add(raw.decode(errors="replace").rstrip("\r"))
    if buffer:
        console.add(buffer.decode(errors="replace"))
    console.close()


async def _wait_for_path(path: Path, deadline: float, proc: subprocess.Popen[bytes], what: str) -> None:
    with trio.move_on_after(deadline):
        while not path.exists():
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with status {proc.returncode} before creating {path}")
            await trio.sleep(0.02)
    if not path.exists():
        pytest.fail(f"{what} did not create {path} within {deadline} s")


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies, even by SIGKILL.

    prctl(PR_SET_PDEATHSIG = 1, SIGKILL), see prctl(2). Teardown kills both processes too;
    this covers the runner itself being killed, which no ``finally`` survives. The signal
    comes when the *thread* that forked exits, so the children are forked from the main
    thread (:func:`_spawn`), never from a worker thread that may retire mid-test.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def _spawn(argv: list[str], stdout: int | IO[bytes]) -> subprocess.Popen[bytes]:
    """Fork and exec on the calling (main) thread; see :func:`_die_with_parent`. Takes milliseconds."""
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
    )


async def _wait_exit(proc: subprocess.Popen[bytes], deadline: float) -> int | None:
    """The exit status, or None if the process is still running after ``deadline`` seconds.

    Waits on a pidfd (readable once the process has exited; pidfd_open(2)), as trio does.
    """
    if proc.poll() is not None:
        return proc.returncode
    pidfd = os.pidfd_open(proc.pid)
    try:
        with trio.move_on_after(deadline):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.poll()


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with trio.CancelScope(shield=True):
        await _wait_exit(proc, 10)


@asynccontextmanager
async def boot_dev_guest(
    image: DevGuestImage,
    workdir: Path,
    agent: str | None,
    *,
    ip: str | None = None,
    extra_qemu: Sequence[str] = (),
) -> AsyncIterator[BootedGuest]:
    """Start vhost-device-vsock and QEMU; yield while the console is being read; kill both.

    ``ip`` goes to the guest as ``cvm.ip``; ``extra_qemu`` is appended to QEMU's argv.

    The sockets live in a short directory of their own: a unix socket path has at most 107
    bytes, and pytest's ``tmp_path`` can come near that.
    """
    sockets = Path(tempfile.mkdtemp(prefix="cvm-boot-"))
    vhost_socket = sockets / "vhost-user.sock"
    vsock_path = sockets / "vm.vsock"
    vhost_log = (workdir / "vhost-device-vsock.log").open("wb")
    vhost = _spawn(
        ["vhost-device-vsock", "--vm", f"guest-cid={GUEST_CID},socket={vhost_socket},uds-path={vsock_path}"],
        vhost_log,
    )
    qemu: subprocess.Popen[bytes] | None = None
    try:
        await _wait_for_path(vhost_socket, 10.0, vhost, "vhost-device-vsock")
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", "1",
            "-m", f"{MEMORY_MIB}M",
            "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
            "-machine", "q35,memory-backend=mem",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio",
            "-no-reboot",
            "-kernel", str(image.kernel),
            "-initrd", str(image.initrd),
            "-append", dev_guest_cmdline(agent, port=AGENT_PORT, ip=ip),
            "-virtfs", f"local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on",
            "-chardev", f"socket,id=vsock0,path={vhost_socket}",
            # The CID belongs to the backend (vhost-device-vsock --vm guest-cid=...); the
            # vhost-user device has no guest-cid property of its own.
            "-device", "vhost-user-vsock-pci,chardev=vsock0",
            *extra_qemu,
        ]  # fmt: skip
        started = trio.current_time()
        qemu = _spawn(argv, subprocess.PIPE)
        assert qemu.stdout is not None
        stdout = trio.lowlevel.FdStream(os.dup(qemu.stdout.fileno()))
        qemu.stdout.close()
        console = Console(started)
        try:
            async with stdout, trio.open_nursery() as nursery:
                nursery.start_soon(_read_lines, stdout, console)
                try:
                    yield BootedGuest(console, vsock_path, qemu)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # show the test's own failure, not a group of one
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    finally:
        if qemu is not None:
            await _stop(qemu)
        await _stop(vhost)
        vhost_log.close()
        shutil.rmtree(sockets, ignore_errors=True)


async def _hybrid_connect(path: Path, port: int, deadline: float) -> trio.SocketStream:
    """Dial ``path`` and do the ``CONNECT <port>\\n`` -> ``OK <n>\\n`` handshake; retry until it works.

    vhost-device-vsock accepts the unix connection at once and closes it when nothing in the
    guest listens on the port yet, so "closed before OK" means "not yet".
    """
    last = "nothing tried"
    with trio.move_on_after(deadline):
        while True:
            try:
                stream = await trio.open_unix_socket(str(path))
            except OSError as exc:
                last = f"connect: {exc}"
                await trio.sleep(0.2)
                continue
            try:
                await stream.send_all(f"CONNECT {port}\n".encode())
                reply = b""
                with trio.move_on_after(5):
                    while not reply.endswith(b"\n"):
                        chunk = await stream.receive_some(1)
                        if not chunk:
                            break
                        reply += chunk
                if reply.startswith(b"OK "):
                    return stream
                last = f"reply {reply!r}"
            except (OSError, trio.BrokenResourceError) as exc:
                last = f"handshake: {exc}"
            await stream.aclose()
            await trio.sleep(0.2)
    pytest.fail(f"hybrid vsock {path} port {port}: no OK within {deadline} s ({last})")


async def _receive_until(stream: trio.SocketStream, marker: bytes, deadline: float) -> bytes:
    data = b""
    with trio.move_on_after(deadline):
        while marker not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data


def _assert_phases(console: Console, phases: tuple[str, ...]) -> None:
    """The markers are in order, the guest uptimes and host times positive and non-decreasing."""
    seen = [m.phase for _, m in console.markers if m.phase in phases]
    assert seen == list(phases), f"phases {seen}, expected {list(phases)}\n{console.tail()}"
    host_times = [t for t, m in console.markers if m.phase in phases]
    uptimes = [m.uptime for _, m in console.markers if m.phase in phases]
    assert all(t > 0 for t in host_times) and all(u > 0 for u in uptimes)
    assert host_times == sorted(host_times) and uptimes == sorted(uptimes), console.markers
    first_kernel_line = next(t for t, line in console.lines if line.startswith("["))
    assert 0 < first_kernel_line < host_times[0]


def _report(console: Console) -> str:
    first_kernel = next((t for t, line in console.lines if line.startswith("[")), math.nan)
    parts = [f"first kernel line {first_kernel:.2f}s"]
    parts += [f"{m.phase} host {t:.2f}s guest {m.uptime:.2f}s" for t, m in console.markers]
    return "; ".join(parts)


STAND_IN_AGENT = textwrap.dedent(
    """\
    #!/usr/bin/python3
    # Stand-in for cvm-agent in the boot test: listens on AF_VSOCK inside the guest, greets
    # one peer and echoes one line back.
    import socket
    import sys

    port = int(sys.argv[sys.argv.index("--listen") + 1].rsplit(":", 1)[1])
    server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    server.bind((socket.VMADDR_CID_ANY, port))
    server.listen(1)
    print("stand-in agent: listening on vsock port", port, flush=True)
    conn, peer = server.accept()
    conn.sendall(b"hello\\n")
    line = b""
    while not line.endswith(b"\\n"):
        chunk = conn.recv(100)
        if not chunk:
            break
        line += chunk
    conn.sendall(b"echo " + line)
    conn.close()
    """
)


async def test_dev_guest_boots_and_reaches_a_vsock_listener(dev_guest: DevGuestImage, tmp_path: Path) -> None:
    """Markers in order; a unix-socket client reaches an AF_VSOCK listener in the guest; clean power-off.

    The listener is a stand-in agent (a python script in ``tmp_path``, which the guest sees
    through the 9p root), so the transport is proven independently of the real agent.
    """
    agent = tmp_path / "stand-in-agent"
    agent.write_text(STAND_IN_AGENT)
    agent.chmod(0o755)
    async with boot_dev_guest(dev_guest, tmp_path, str(agent)) as guest:
        await guest.console.wait_for("agent-exec", BOOT_DEADLINE)
        stream = await _hybrid_connect(guest.vsock_path, AGENT_PORT, AGENT_DEADLINE)
        async with stream:
            assert await _receive_until(stream, b"\n", 10) == b"hello\n"
            await stream.send_all(b"ping\n")
            assert await _receive_until(stream, b"\n", 10) == b"echo ping\n"
        exit_marker = await guest.console.wait_for("agent-exit", 30)
        assert exit_marker[1].detail == "0", guest.console.tail()
        await guest.console.wait_for("poweroff", POWEROFF_DEADLINE)
        status = await _wait_exit(guest.qemu, POWEROFF_DEADLINE)
        assert status == 0, guest.console.tail()
        _assert_phases(guest.console, (*BOOT_PHASES, "agent-exit", "poweroff"))
        loaded = guest.console.marker("modules-loaded")
        assert loaded is not None and loaded[1].detail == "tee=none"  # TCG: no SNP, no TDX
        print(_report(guest.console))


def _agent_ready() -> str | None:
    """Why the real agent cannot be tested yet, or None when it can."""
    agent = Path(sys.executable).parent / "cvm-agent"
    if not agent.exists():
        return f"{agent} missing"
    try:
        if importlib.util.find_spec("guest_agent.main") is None:
            return "guest_agent.main not written yet"
    except ImportError as exc:
        return f"guest_agent.main does not import: {exc}"
    return None


async def test_dev_guest_agent_answers_over_hybrid_vsock(dev_guest: DevGuestImage, tmp_path: Path) -> None:
    """The real ``cvm-agent`` from the venv, started by /init, answers gRPC health and GetInfo over vsock."""
    reason = _agent_ready()
    if reason is not None:
        pytest.skip(f"cvm-agent not ready: {reason}")
    from cvm.v1 import agent_pb2, agent_pb2_grpc
    from cvmcore.address import HybridVsockAddress
    from cvmcore.client import connect

    agent = str(Path(sys.executable).parent / "cvm-agent")
    async with boot_dev_guest(dev_guest, tmp_path, agent) as guest:
        exec_time, _ = await guest.console.wait_for("agent-exec", BOOT_DEADLINE)
        # Wait until the agent listens (the handshake succeeds), then talk gRPC through the
        # project's own relay, as cvmctl does.
        probe = await _hybrid_connect(guest.vsock_path, AGENT_PORT, AGENT_DEADLINE)
        await probe.aclose()
        address = HybridVsockAddress(str(guest.vsock_path), AGENT_PORT)
        with trio.fail_after(60):
            async with connect(address, timeout=20) as client:
                assert await client.health() == "SERVING"
                ready = trio.current_time() - guest.console.started
                stub = agent_pb2_grpc.GuestAgentStub(client.channel)
                info = await client.call(stub.GetInfo, agent_pb2.GetInfoRequest())
        assert info.kernel_release == dev_guest.kernel_release
        assert f"cvm.agent={agent}" in info.kernel_cmdline
        _assert_phases(guest.console, BOOT_PHASES)
        assert ready > exec_time
        print(f"{_report(guest.console)}; agent SERVING host {ready:.2f}s")


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _http_get(port: int, path: str, deadline: float) -> bytes:
    """GET over loopback, retried until it answers (the guest's server may not be up yet)."""
    last = "nothing tried"
    with trio.move_on_after(deadline):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n".encode())
                    reply = await _receive_until(stream, b"\0never", 10)
                if reply.startswith(b"HTTP/"):
                    return reply
                last = f"reply {reply[:60]!r}"
            except (OSError, trio.BrokenResourceError) as exc:  # slirp resets until the guest listens
                last = str(exc)
            await trio.sleep(0.5)
    pytest.fail(f"http://127.0.0.1:{port}{path}: no answer within {deadline} s ({last})")


async def test_dev_guest_runs_a_host_program_as_a_network_workload(
    dev_guest: DevGuestImage, tmp_path: Path
) -> None:
    """A server from the host root runs in the guest and answers through user networking.

    The "agent" here is a shell script that serves ``tmp_path`` with ``python3 -m
    http.server`` on the static address ``cvm.ip`` gives eth0 (QEMU user networking's
    10.0.2.15); QEMU forwards a loopback port to it. This is the path a workload (nginx,
    memcached, iperf3 installed on the host) takes: binaries and config from the 9p root,
    writes into the overlay, traffic over virtio-net.
    """
    (tmp_path / "hello.txt").write_text("hello from the host root\n")
    agent = tmp_path / "serve"
    agent.write_text(f"#!/bin/sh\ncd {tmp_path} && exec python3 -m http.server --bind 10.0.2.15 8080\n")
    agent.chmod(0o755)
    port = _free_loopback_port()
    netdev = [
        "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:8080",
        "-device", "virtio-net-pci,netdev=net0",
    ]  # fmt: skip
    async with boot_dev_guest(
        dev_guest, tmp_path, str(agent), ip="10.0.2.15/24,10.0.2.2", extra_qemu=netdev
    ) as guest:
        await guest.console.wait_for("agent-exec", BOOT_DEADLINE)
        reply = await _http_get(port, "/hello.txt", AGENT_DEADLINE)
        assert reply.split(b"\r\n", 1)[0].endswith(b"200 OK"), reply
        assert reply.endswith(b"hello from the host root\n")
        assert guest.console.marker("net-failed") is None, guest.console.tail()
